"""DeepSpeed's ``deepspeed.runtime.data_pipeline``: random-LTD under ``data_routing`` (core/random_ltd.py)
and the metric-based curriculum under ``data_sampling`` (core/data_sampler.py, core/data_analyzer.py)."""
