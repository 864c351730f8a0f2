"""``protege export``: ship a distilled student — native format, ONNX, int8 ONNX — with what it costs.

An application (layer 9, docs/architecture.md): it reads finished runs through the pipeline and
writes new directories; nothing below it imports it. The ONNX packages are the ``export`` extra
(``pip install 'protege[export]'``), imported only when an ONNX format is asked for.

>>> import protege as pg
>>> pg.export("runs/mnist-kd", format="int8", calibration=512)   # runs/mnist-kd/export-int8/
>>> pg.bench("runs/mnist-kd", exports=["runs/mnist-kd/export-int8"])

Quantization-aware distillation is not here: it is a run option (``quantize: int8``,
:mod:`protege.core.fake_quant`); exporting such a run to int8 uses the ranges it learned.
"""

from .benchmark import bench
from .exporter import FORMATS, default_out, export

__all__ = ["FORMATS", "bench", "default_out", "export"]
