"""DeepSpeed's ``data_sampling``: ``DataAnalyzer`` writes per-sample metric index files,
``DeepSpeedDataSampler`` draws curriculum batches from them (machinery in core/)."""
