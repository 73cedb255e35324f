"""Time-series forecasting with honest baselines: data, models, metrics and the commands."""
