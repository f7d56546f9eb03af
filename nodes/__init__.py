"""The ComfyUI layer: V3 nodes over glance_core. Node ids are permanent (workflows refer to them)."""
from comfy_api.v0_0_2 import ComfyExtension, io

from .compare_node import GlanceCompareGrid, GlanceSamplingTimer
from .loader_node import GlanceLoRAPairLoader
from .sampler_node import GlanceSampler
from .schedule_node import GlanceSchedule
from .train_node import GlanceTrainLoRAPair

NODES = [GlanceLoRAPairLoader, GlanceSchedule, GlanceSampler, GlanceTrainLoRAPair, GlanceSamplingTimer, GlanceCompareGrid]


class GlanceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
