"""onnxruntime sessions for verification, and the facts about the installed onnxruntime we need.

onnxruntime (about 0.1 s) and onnx are imported inside the functions: importing this module is
cheap, so ``bnfold --help`` and the report-only paths never pay for them.

Rules (see ``docs``/pitfalls): sessions are built from the model's *path* so external data resolves
next to the model; graph optimisations are off by default (onnxruntime's BASIC level already fuses
Conv+BN, so a reference run with them on would compare folded with folded); a requested CUDA provider
is checked in ``session.get_providers()`` because onnxruntime silently falls back to CPU.
"""
from __future__ import annotations

import functools
import os
import re
from typing import TYPE_CHECKING

from bnfold.errors import BadInputError, ProviderUnavailable, UnsupportedModelError, first_line
from bnfold.records import InputSpec

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import onnxruntime

__all__ = ["make_session", "make_session_from_model", "ort_max_ir_version", "input_specs", "quiet_logging",
           "ort_message", "PROVIDERS", "CUDA_SETTINGS", "QUIET"]

#: short provider names accepted by ``make_session`` -> onnxruntime execution provider
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}

# CUDA settings for a reproducible comparison: TF32 in cuDNN convolutions and EXHAUSTIVE algorithm
# search each move fp32 results by 1e-6..1e-3, more than the fp32 tolerance allows.
_CUDA_OPTIONS = {
    "use_tf32": "0",
    "cudnn_conv_algo_search": "DEFAULT",
}

#: what a CUDA verification session is configured with (recorded in reports)
CUDA_SETTINGS = {"use_tf32": "0 unless --tf32", "cudnn_conv_algo_search": "DEFAULT",
                 "deterministic_compute": True}

# "/onnxruntime_src/onnxruntime/core/graph/model.cc:256 onnxruntime::Model::Model(...) " noise
_SRC_LOCATION = re.compile(r"[^\s:]*onnxruntime_src[^\s:]*:\d+\s+")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_CPP_SIGNATURE = re.compile(r"(?:[A-Za-z_]\w*::)+~?[A-Za-z_]\w*\([^()]*\)\s*(?:const\s*)?")


def _provider_name(provider: str) -> str:
    key = provider.strip().lower()
    if key in PROVIDERS:
        return PROVIDERS[key]
    for full in PROVIDERS.values():
        if key == full.lower():
            return full
    raise BadInputError(
        f"unknown execution provider {provider!r}: use one of {', '.join(sorted(PROVIDERS))}"
    )


def _ort_message(exc: BaseException) -> str:
    """onnxruntime's first message line, without the C++ source location and signature."""
    line = first_line(exc).strip()
    cleaned = _CPP_SIGNATURE.sub("", _SRC_LOCATION.sub("", _ORT_PREFIX.sub("", line))).strip()
    return cleaned or line


def ort_message(exc: BaseException) -> str:
    """onnxruntime's reason in one line, without its C++ source locations (for bnfold's messages)."""
    return _SRC_LOCATION.sub("", _ort_message(exc))


#: onnxruntime's log level for bnfold's sessions: FATAL only. At ERROR (3) onnxruntime prints its
#: own colour-coded line (``[E:onnxruntime:...]`` in ANSI escapes) on stderr for a node that fails,
#: before bnfold's one-line message, which carries the same text from the exception.
QUIET = 4


@functools.cache
def quiet_logging() -> None:
    """Silence onnxruntime's default logger (the one used outside sessions), once per process."""
    import onnxruntime as ort

    ort.set_default_logger_severity(QUIET)


def _session_options(optimize: bool) -> onnxruntime.SessionOptions:
    import onnxruntime as ort

    quiet_logging()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.use_deterministic_compute = True
    opts.log_severity_level = QUIET  # no provider fallback chatter, no colour error line on stderr
    return opts


def make_session(
    model_path: str | os.PathLike,
    provider: str = "cpu",
    optimize: bool = False,
    tf32: bool = False,
) -> onnxruntime.InferenceSession:
    """Build an onnxruntime session from ``model_path``.

    ``optimize=False`` (the default) sets ``ORT_DISABLE_ALL``. ``provider`` is ``'cpu'`` or
    ``'cuda'`` (the full execution-provider names are accepted too). Raises
    :class:`BadInputError` for a missing file or an unknown provider and
    :class:`UnsupportedModelError` when onnxruntime refuses the model or CUDA is not available.
    """
    import onnxruntime as ort

    ep = _provider_name(provider)
    path = os.fspath(model_path)
    if not os.path.isfile(path):
        raise BadInputError(f"model file not found: {path}")

    if ep == "CUDAExecutionProvider":
        available = ort.get_available_providers()
        if ep not in available:
            raise ProviderUnavailable(
                "CUDA execution provider requested but not available: onnxruntime "
                f"{ort.__version__} offers {', '.join(available)}; install onnxruntime-gpu "
                "(and uninstall onnxruntime) or use providers=('cpu',) (or allow_missing_providers=True)"
            )
        options = dict(_CUDA_OPTIONS, use_tf32="1" if tf32 else "0")
        providers: list = [(ep, options), "CPUExecutionProvider"]
    else:
        providers = [ep]

    try:
        session = ort.InferenceSession(path, sess_options=_session_options(optimize), providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        message = _ort_message(exc)
        hint = ""
        if "IR version" in message:
            hint = f"; save the model with ir_version <= {ort_max_ir_version()}"
        elif "consumed_inputs" in message:  # opset-6 operators (caffe2 and early converters)
            hint = ("; onnxruntime no longer runs opset-6 operators: convert the model to opset 7 or later "
                    "(onnx.version_converter.convert_version) (or verify=False to write it unverified)")
        raise UnsupportedModelError(
            f"onnxruntime {ort.__version__} cannot load {path}: {message}{hint}"
        ) from None

    if ep not in session.get_providers():
        raise ProviderUnavailable(
            f"CUDA execution provider requested but not available: the session fell back to "
            f"{', '.join(session.get_providers())}; install onnxruntime-gpu with a CUDA/cuDNN "
            "matching this machine, or use providers=('cpu',) (or allow_missing_providers=True)"
        )
    return session


#: onnxruntime session option (1.20+): where a model loaded from bytes finds its external data
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_EXTERNAL_FOLDER_SINCE = (1, 20)  # conservatively: older releases get the file fallback


def _ort_version() -> tuple[int, int]:
    import onnxruntime as ort

    m = re.match(r"(\d+)\.(\d+)", ort.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def make_session_from_model(model: onnx.ModelProto, base_dir: str | os.PathLike) -> onnxruntime.InferenceSession:
    """A CPU session (``ORT_DISABLE_ALL``) for an in-memory ``model`` whose external-data locations
    are relative to ``base_dir`` (the folder of the file it was read from, with
    ``load_external_data=False``).

    The serialized model holds no external tensors, so it stays small whatever the weights weigh,
    and onnxruntime reads the weights from ``base_dir`` itself. Used for the fold-site copies,
    which must not be written next to a user's model. Raises whatever onnxruntime raises (an
    onnxruntime without the option cannot find the data): callers fall back to a file.
    """
    import onnx
    import onnxruntime as ort

    if _ort_version() < _EXTERNAL_FOLDER_SINCE and any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        # an older onnxruntime would look for the data relative to the current folder
        raise UnsupportedModelError(f"onnxruntime {ort.__version__} cannot read external data of a model "
                                    "loaded from bytes")
    opts = _session_options(False)
    opts.add_session_config_entry(_EXTERNAL_FOLDER_KEY, os.path.abspath(os.fspath(base_dir)))
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


@functools.cache
def ort_max_ir_version() -> int:
    """Highest ONNX IR version the installed onnxruntime accepts (13 for onnxruntime 1.31).

    Probed once per process: a one-node Identity model at ``onnx.IR_VERSION`` and downwards.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "bnfold_ir_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    quiet_logging()
    opts = ort.SessionOptions()
    opts.log_severity_level = QUIET
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for ir in range(onnx.IR_VERSION, 2, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(
                model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception:
            continue
        return ir
    raise UnsupportedModelError(  # pragma: no cover - a broken onnxruntime install
        f"onnxruntime {ort.__version__} accepts no ONNX IR version between 3 and {onnx.IR_VERSION}"
    )


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a user feeds: ``graph.input`` minus initializers (old-IR models list both).

    Dtypes are numpy dtypes (``ml_dtypes`` ones for bfloat16/float8), dims are ``dim_value`` or
    ``None`` for symbolic/unknown dims; ``shape`` is ``None`` when the rank is unknown. A non-tensor
    input raises :class:`UnsupportedModelError`.
    """
    from onnx import helper

    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    initializers.update(init.values.name for init in graph.sparse_initializer)
    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise UnsupportedModelError(
                f"graph input {value.name!r} is not a tensor; bnfold feeds tensors only"
            )
        tensor_type = value.type.tensor_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        except Exception:
            raise UnsupportedModelError(
                f"graph input {value.name!r} has an unsupported element type {tensor_type.elem_type}"
            ) from None
        shape = (
            tuple(
                dim.dim_value if dim.WhichOneof("value") == "dim_value" else None
                for dim in tensor_type.shape.dim
            )
            if tensor_type.HasField("shape")
            else None  # unknown rank
        )
        specs.append(InputSpec(name=value.name, dtype=dtype, shape=shape))
    return specs
