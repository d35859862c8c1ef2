"""DeepSpeed's ``CurriculumScheduler`` at DeepSpeed's path (machinery: core/curriculum_scheduler.py)."""

from zerostep.core.curriculum_scheduler import CurriculumScheduler

__all__ = ["CurriculumScheduler"]
