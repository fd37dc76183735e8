"""The pipeline behind :func:`fxcompress.optimize`: budget, plan, closed loop, trial selection."""
