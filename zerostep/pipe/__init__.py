"""``zerostep.pipe``: DeepSpeed's ``deepspeed.pipe`` names.

``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec`` (``zerostep.core.pipeline_module``) and the rank
grids ``ProcessTopology``, ``PipeDataParallelTopology`` (``zerostep.parallel.pipeline``). A
``PipelineModule`` given to ``zerostep.initialize`` trains through the pipeline engine
(``zerostep.core.pipeline_engine``).
"""

from zerostep.core.pipeline_module import LayerSpec, PipelineModule, TiedLayerSpec
from zerostep.parallel.pipeline import PipeDataParallelTopology, ProcessTopology

__all__ = ["LayerSpec", "PipeDataParallelTopology", "PipelineModule", "ProcessTopology", "TiedLayerSpec"]
