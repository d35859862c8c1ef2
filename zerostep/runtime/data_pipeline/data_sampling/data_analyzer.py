"""DeepSpeed's ``DataAnalyzer`` at DeepSpeed's path (machinery: core/data_analyzer.py)."""

from zerostep.core.data_analyzer import DataAnalyzer

__all__ = ["DataAnalyzer"]
