"""DeepSpeed's ``deepspeed.runtime.data_pipeline``: random-LTD under ``data_routing`` (core/random_ltd.py).
``data_sampling`` (the metric-based curriculum dataloader) is not implemented."""
