"""CPU kernels (csrc/gemv.c for decoding, csrc/gemm.c for prefill), compiled on first use with the system C compiler.

PyTorch's CPU kernels for one row of activations read fp32/bf16 weights at ~60-70% of memory bandwidth and int8/int4
weights far slower (`_weight_int8pack_mm` needs bf16 activations, `_weight_int4pack_mm_for_cpu` is compute-bound).
gemv.c reads every format once, at close to the streaming bandwidth, for a few rows of fp32 activations. The shared
library is built with `cc -O3 -march=native -ffast-math -fopenmp` (linked without -ffast-math, so no process-wide
flush-to-zero) into ~/.cache/moelm (or $MOELM_CACHE) and loaded with ctypes;
without a compiler (or with MOELM_NO_KERNELS=1) `available()` is False and callers use PyTorch's kernels instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..io.files import atomic_write_bytes
from . import cpu

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("gemv.c", "gemm.c", "intgemm.c", "repack.c")]
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
# Linked in a second step without -ffast-math: linking with it adds crtfastmath.o, whose start-up code turns on
# flush-to-zero and denormals-are-zero for the whole process (subnormals would vanish in Python, numpy, torch).
LINK = ["-shared", "-fopenmp"]
LIBS = ["-lm"]  # after the objects: the vectorised expf of -ffast-math lives in libm's libmvec
MAX_ROWS = 16  # more rows of activations than this: a dense matmul is faster
GRAIN = 1 << 16  # multiply-adds (or elements) per OpenMP thread at least: smaller calls run on one thread
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_ONEDNN_OK: dict[tuple, bool] = {}


def _finish(job: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = job.communicate()
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def _compile() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = b"".join(path.read_bytes() for path in SOURCES)
    flags = " ".join([compiler, *FLAGS, "|", *LINK, *LIBS])
    # -march=native: a library built on one CPU is never loaded on another (a cache shared between machines)
    machine = f"{os.uname().machine}|{cpu.info().model}|{' '.join(sorted(cpu.info().flags))}"
    key = hashlib.sha256(source + flags.encode() + machine.encode()).hexdigest()
    target = cpu.cache_dir() / key[:16] / "gemv.so"
    if not target.is_file():
        with tempfile.TemporaryDirectory() as tmp:  # the system's: the cache may be read-only or full
            built = Path(tmp) / "gemv.so"
            objects = [str(Path(tmp) / f"{path.stem}.o") for path in SOURCES]
            jobs = [subprocess.Popen([compiler, *FLAGS, "-c", "-o", obj, str(path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for path, obj in zip(SOURCES, objects)]
            result = next((r for r in (_finish(job) for job in jobs) if r.returncode != 0), None)
            if result is None:
                result = subprocess.run([compiler, *LINK, "-o", str(built), *objects, *LIBS],
                                        capture_output=True, text=True)
            if result.returncode != 0:
                warnings.warn(f"moelm: could not compile {', '.join(p.name for p in SOURCES)} with {compiler} "
                              f"(falling back to PyTorch "
                              f"kernels): {result.stderr.strip()[:500]}")
                return None
            return _declare(ctypes.CDLL(str(_kept(built, target))))
    return _declare(ctypes.CDLL(str(target)))


def _kept(built: Path, target: Path) -> Path:
    """target, the library just `built` copied there (atomically: concurrent processes see the whole library or
    none); where the cache cannot be written (read-only, full), `built` itself, with a warning."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, built.read_bytes())
        return target
    except OSError as e:
        warnings.warn(f"moelm: cannot keep the compiled kernels in {cpu.cache_dir()} ({e.strerror or e}); each "
                      "process compiles them again", stacklevel=2)
        return built


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The library with its functions' argument and result types set."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in ("gemv_f32", "gemv_bf16", "gemv_i8", "gemv_i4"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
        fn.restype = None
    lib.gemm_f32.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.gemm_f32.restype = None
    lib.dequant_i8.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.dequant_i4.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, i64, ptr, ctypes.c_int]
    lib.dequant_i8.restype = lib.dequant_i4.restype = None
    for fn in (lib.rmsnorm_f32, lib.rmsnorm_bf16):
        fn.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr]
        fn.restype = None
    for fn in (lib.layernorm_f32, lib.layernorm_bf16):
        fn.argtypes, fn.restype = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ptr], None
    for fn in (lib.attend_f32, lib.attend_bf16):
        fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_int, ptr, ptr, i64, i64, ptr, i64,
                       ptr, ptr, i64, ctypes.c_float, ptr, ctypes.c_int]
        fn.restype = None
    for fn in (lib.decode_layer, lib.decode_layer_bf16):
        fn.argtypes = [ctypes.POINTER(Layer), ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, i64, ptr, ptr, i64,
                       ptr, ptr, ptr, ctypes.c_int]
        fn.restype = None
    lib.decode_layers.argtypes = [ptr, ptr, i64, ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, i64,
                                  ptr, ptr, i64, ptr, ptr]
    lib.decode_layers.restype = None
    lib.moe_block.argtypes, lib.moe_block.restype = [ctypes.POINTER(Moe), ptr, i64, i64, ptr, ptr, ptr, ptr,
                                                     ctypes.c_int], None
    _intgemm_types(lib)
    lib.gemv_wide.argtypes, lib.gemv_wide.restype = [ctypes.c_int], ctypes.c_int
    lib.gemv_wide_i8.argtypes, lib.gemv_wide_i8.restype = [ctypes.c_int], ctypes.c_int
    lib.unpair_i4.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.unsign_i8.argtypes = [ptr, i64, ptr, i64, i64, i64, ctypes.c_int]
    lib.unpair_i4.restype = lib.unsign_i8.restype = None
    lib.half_to_float.argtypes, lib.half_to_float.restype = [ctypes.c_uint16], ctypes.c_float
    return lib


def _intgemm_types(lib: ctypes.CDLL):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.intgemm_variants.restype = ctypes.c_int
    lib.intgemm_quantize.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.intgemm_quantize.restype = None
    lib.intgemm.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int, i64, i64, i64, ptr, ctypes.c_int,
                            ctypes.c_int, ctypes.c_int]
    lib.intgemm.restype = ctypes.c_int
    lib.intgemm_experts.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_int,
                                    ctypes.c_int, i64, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.intgemm_experts.restype = ctypes.c_int


class Mat(ctypes.Structure):
    """A projection's weight for decode_layer (gemv.c's Mat): format, pointers and sizes."""
    _fields_ = [("fmt", ctypes.c_int64), ("w", ctypes.c_void_p), ("wrow", ctypes.c_int64),
                ("scale", ctypes.c_void_p), ("srow", ctypes.c_int64), ("G", ctypes.c_int64),
                ("bias", ctypes.c_void_p), ("O", ctypes.c_int64), ("bias16", ctypes.c_void_p)]


class Moe(ctypes.Structure):
    """A mixture-of-experts block for moe_block / decode_layer (gemv.c's Moe)."""
    _fields_ = [("kind", ctypes.c_int64), ("router", ctypes.POINTER(Mat)), ("bias", ctypes.c_void_p),
                ("E", ctypes.c_int64), ("K", ctypes.c_int64), ("norm_min", ctypes.c_float),
                ("jitter", ctypes.c_float)] + [(name, ctypes.POINTER(Mat)) for name in ("gate_up", "down", "sgate_up",
                                                                                       "sdown")]


class Layer(ctypes.Structure):
    """A decoder layer's fixed parts for decode_layer (gemv.c's Layer)."""
    _fields_ = [("n1", ctypes.c_void_p), ("n2", ctypes.c_void_p), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
                ("qkv", ctypes.POINTER(Mat)), ("o", ctypes.POINTER(Mat)), ("gate_up", ctypes.POINTER(Mat)),
                ("down", ctypes.POINTER(Mat)), ("H", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64),
                ("rotation", ctypes.c_int64), ("scale", ctypes.c_float), ("moe", ctypes.POINTER(Moe)),
                ("b1", ctypes.c_void_p), ("b2", ctypes.c_void_p)]


MAT_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}


def mat(weight: torch.Tensor, scale: torch.Tensor | None = None, group_size: int = 0,
        bias: torch.Tensor | None = None) -> Mat:
    """The Mat of a contiguous CPU weight [O, I] in one of gemv()'s formats (bias: fp32 or bf16, contiguous, read
    where it is: a bf16 model's bias edited in place is seen); the caller keeps the tensors alive."""
    srow = scale.shape[-1] if scale is not None and group_size else 1
    fmt = 4 if _half(weight, scale) else MAT_FORMATS[weight.dtype]
    if weight.dtype in WIDTHS:
        _USED.add(weight.dtype)
    bf16 = bias is not None and bias.dtype == torch.bfloat16
    return Mat(fmt, weight.data_ptr(), weight.shape[-1], _ptr(scale), srow, group_size, None if bf16 else _ptr(bias),
               weight.shape[0], _ptr(bias) if bf16 else None)


def _half(weight: torch.Tensor, scale: torch.Tensor | None) -> int:
    """1 for int4 weights with fp16 scales, 0 for fp32 scales (or none); any other scales are an error."""
    if scale is None or scale.dtype == torch.float32:
        return 0
    if scale.dtype == torch.float16 and weight.dtype == torch.uint8:
        return 1
    raise ValueError(f"{weight.dtype} weights with {scale.dtype} scales: the kernels take fp32 scales, or fp16 "
                     "ones for int4")


_FUNCTIONS: dict = {}  # weight dtype -> the library's function for it


def library() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        try:
            _lib = None if os.environ.get("MOELM_NO_KERNELS") else _compile()
        except OSError as e:  # no temporary folder to compile in, or the library will not load from it
            warnings.warn(f"moelm: cannot compile the CPU kernels (falling back to PyTorch kernels): {e}")
            _lib = None
        if _lib is not None:
            _FUNCTIONS.update({dtype: getattr(_lib, name) for dtype, name in _FORMATS.items()})
    return _lib


def available() -> bool:
    return library() is not None


def _require():
    if not _FUNCTIONS and library() is None:
        raise RuntimeError("moelm's CPU kernels are not available (no C compiler, or MOELM_NO_KERNELS is set)")


def plain_only(x: torch.Tensor) -> bool:
    """Whether only the model's plain PyTorch ops may run on x: while torch.compile traces (the kernels' data
    pointers and oneDNN calls are opaque to it) or under autocast for x's device (which the fast paths ignore)."""
    return torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)


def usable(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether gemv() can take these activations [..., I] and weights: CPU, few rows, I a multiple of 32, no
    gradients needed (the kernels have no backward), kernels built."""
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights))
    plain = type(x) is torch.Tensor  # a tensor subclass may hold no data of its own
    return (plain and x.device.type == "cpu" and x.numel() // x.shape[-1] <= MAX_ROWS and x.shape[-1] % 32 == 0
            and not grads and available())


def onednn_works(inp: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's inner product takes plain CPU tensors (fp32 everywhere, bf16 only on CPUs with bf16 support)."""
    if inp.device.type != "cpu" or not torch.backends.mkldnn.is_available() or \
            {inp.dtype, weight.dtype} - {torch.float32, torch.bfloat16, torch.float16}:
        return False
    key = (inp.dtype, weight.dtype)
    if key not in _ONEDNN_OK:
        try:
            probe = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=inp.dtype),
                                                       torch.ones(4, 8, dtype=weight.dtype), None, "none", [], "")
            _ONEDNN_OK[key] = bool((probe == 8).all())
        except (RuntimeError, NotImplementedError, AttributeError):
            _ONEDNN_OK[key] = False
    return _ONEDNN_OK[key]


def onednn_linear(x: torch.Tensor, w: torch.Tensor, swap: bool = False) -> torch.Tensor:
    """x [M, in] @ w [out, in].T -> [M, out] with oneDNN's inner product (no autograd; check onednn_works first).

    On this class of AMD CPUs it beats the MKL sgemm behind F.linear by 5-20% for tens to hundreds of rows; with
    swap=True (w @ x.T, the big weight read in its own layout) by ~20% for 5-16 rows and 1.6x for expert-sized
    groups of ~24 rows."""
    if swap:
        return torch.ops.mkldnn._linear_pointwise(w, x, None, "none", [], "").T
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


_FORMATS = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16", torch.int8: "gemv_i8", torch.uint8: "gemv_i4"}


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, group_size: int = 0,
         bias: torch.Tensor | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., I] (any float dtype; computed in fp32) times weight [O, I] (or [E, O, I] with `select` [rows] picking
    a matrix per row of x) -> [..., O] fp32.

    weight: fp32, bf16, int8 (scale fp32 [O] or [E, O]), or uint8 int4 pairs [.., O, I/2] (scale fp32 or fp16
    [.., O, I/group_size]).
    Under torch.compile it is the custom op moelm::gemv, opaque to the compiler."""
    if torch.compiler.is_compiling():
        return _gemv_op(x, weight, scale, group_size, bias, select)
    return _gemv(x, weight, scale, group_size, bias, select)


# gemv.c's decode kernels for int4 (groups of 64 and 32) and int8 weights in 256-bit ("ymm") or, where the CPU has
# AVX-512BW, 512-bit vectors ("zmm": the same int16 products summed in another order; int8 by VNNI's vpdpwssd
# where the CPU has it), for int4 also with a one-row run's weight rows taken by pairs ("zmm2": each row summed as
# "zmm" sums it). Per weight dtype: the choice, and its paths as gemv_wide / gemv_wide_i8 number them.
WIDTHS = {torch.uint8: ("int4_g64", {"ymm": 0, "zmm": 1, "zmm2": 2}), torch.int8: ("int8_width", {"ymm": 0, "zmm": 1})}
for _op, _paths in WIDTHS.values():
    cpu.register(_op, tuple(_paths))
_TOLD: dict[str, str] = {}  # choice -> the path gemv.c was last told
_USED: set = set()  # the weight dtypes of WIDTHS a Mat was made for: decode_layer and moe_block tell only theirs


def _width(dtype: torch.dtype) -> None:
    """gemv.c told the kernel width chosen for `dtype` weights on this CPU: measured once per CPU and remembered."""
    op, paths = WIDTHS[dtype]
    path = cpu.chosen(op, ()) or _choose_width(dtype)
    if _TOLD.get(op) != path:
        _set_width(dtype, paths[path])
        _TOLD[op] = path


def _set_width(dtype: torch.dtype, value: int) -> int:
    return (_lib.gemv_wide if dtype == torch.uint8 else _lib.gemv_wide_i8)(value)


def _choose_width(dtype: torch.dtype) -> str:
    """The probe times 4 rows of x in cache (the arithmetic, which bounds batches > 1) and one row of x a call over
    stacked experts (24 of [1536, 2560]: 47 MB in int4, 94 MB in int8), six a call (a decoding step's MoE block, from
    memory)."""
    op, paths = WIDTHS[dtype]
    if _set_width(dtype, -1) < 0:  # no AVX-512BW: only the 256-bit kernels are built
        return cpu.choose(op, (), {"ymm": lambda: None})
    int4 = dtype == torch.uint8
    width, (half, srow, group) = (1280, (1, 40, 64)) if int4 else (2560, (0, 1, 0))
    g = torch.Generator().manual_seed(0)

    def codes(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) if int4 else \
            torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)

    def scales(*shape):  # int4 scales are fp16 unless a checkpoint's do not fit
        return torch.rand(*shape, 40, generator=g).half() if int4 else torch.rand(*shape, generator=g)

    q, scale = codes(512, width), scales(512)
    x, y = torch.randn(4, 2560, generator=g), torch.empty(4, 512)
    experts, escale = codes(24, 1536, width), scales(24, 1536)
    picks = torch.arange(24).view(4, 6)  # four calls of six experts, one row of x each
    rows, out = torch.randn(6, 2560, generator=g), torch.empty(6, 1536)
    fn = _lib.gemv_i4 if int4 else _lib.gemv_i8
    _TOLD[op] = "probe"

    def run(value: int):
        _set_width(dtype, value)
        fn(x.data_ptr(), 4, 2560, q.data_ptr(), width, scale.data_ptr(), half, srow, group, None, None, 512,
           y.data_ptr(), threads(4 * 2560 * 512))
        for sel in picks:
            fn(rows.data_ptr(), 6, 2560, experts.data_ptr(), width, escale.data_ptr(), half, srow, group, None,
               sel.data_ptr(), 1536, out.data_ptr(), threads(6 * 2560 * 1536))
    return cpu.choose(op, (), {name: functools.partial(run, value) for name, value in paths.items()})


def _widths() -> None:
    """gemv.c told the widths for the quantized formats whose Mats were made (decode_layer, moe_block)."""
    for dtype in _USED:
        _width(dtype)


def _gemv(x, weight, scale, group_size, bias, select):
    _require()
    _check("gemv", x, weight, scale, bias, multiple=32)
    if weight.dtype in WIDTHS:
        _width(weight.dtype)
    shape = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    rows, features = x.numel() // shape[-1], shape[-1]
    out_features = weight.shape[-2]
    y = torch.empty(rows, out_features, dtype=torch.float32)
    if select is not None:
        select = select.reshape(-1).to(torch.int64).contiguous()
    srow = scale.shape[-1] if scale is not None and group_size else 1
    _FUNCTIONS[weight.dtype](x.data_ptr(), rows, features, weight.data_ptr(), weight.shape[-1], _ptr(scale),
                             _half(weight, scale), srow, group_size, _ptr(bias), _ptr(select), out_features,
                             y.data_ptr(), threads(rows * features * out_features))
    return y.view(*shape[:-1], out_features)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
           multiple: int = 1) -> None:
    """What the C kernels read without checking: x [..., I] against weight [.., O, I] (int4: [.., O, I/2]), I a
    `multiple`; weight and scale contiguous; bias fp32 [O], contiguous. A ValueError naming the input at fault
    (else a silently wrong result, or memory read past the tensors)."""
    features = weight.shape[-1] * (2 if weight.dtype == torch.uint8 else 1)
    if x.shape[-1] != features or features % multiple:
        raise ValueError(f"{op}: x has {x.shape[-1]} input features and the weight {features}"
                         + (f"; they must be equal and a multiple of {multiple}" if multiple > 1 else ""))
    for name, t in (("weight", weight), ("scale", scale), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: the {name} must be contiguous")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != weight.shape[-2:-1]):
        raise ValueError(f"{op}: the bias must be fp32 [{weight.shape[-2]}], got {bias.dtype} {list(bias.shape)}")


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x [..., I] @ weight [O, I].T (+ fp32 bias [O]) -> [..., O] with csrc/gemm.c (for many rows: prefill);
    weight and bias contiguous."""
    _require()
    _check("gemm", x, weight, None, bias)
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"gemm: x and the weight must be fp32, got {x.dtype} and {weight.dtype}")
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    rows, features, out_features = x.shape[0], shape[-1], weight.shape[0]
    padded = -(-rows // 16) * 16
    yt = torch.empty(out_features, padded, dtype=torch.float32)  # y transposed (gemm.c's layout)
    _lib.gemm_f32(x.data_ptr(), rows, features, weight.data_ptr(), out_features, _ptr(bias), yt.data_ptr(),
                  threads(rows * features * out_features))
    return yt[:, :rows].T.reshape(*shape[:-1], out_features)


INT_VARIANTS = ("avx2", "avxvnni", "avx512vnni", "amx")  # csrc/intgemm.c's variants, in its numbering


def int_variants() -> list[str]:
    """The variants of intgemm() compiled for this CPU (none without kernels)."""
    return list(_int_variants()) if available() else []


@functools.cache
def _int_variants() -> tuple[str, ...]:
    mask = _lib.intgemm_variants()
    return tuple(name for i, name in enumerate(INT_VARIANTS) if mask >> i & 1)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 x [M, K] (K a multiple of 32) -> (xq int8 [M, K], d fp32 [M, K/32], sums int32 [M, K/32]): intgemm()'s
    activations, per row per block of 32: d = max|x| * (1/127), xq = round(x * (1/d)), sums = the blocks' xq sums."""
    _require()
    x = x.float().contiguous()
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8)
    d = torch.empty(m, k // 32, dtype=torch.float32)
    sums = torch.empty(m, k // 32, dtype=torch.int32)
    _lib.intgemm_quantize(x.data_ptr(), m, k, xq.data_ptr(), d.data_ptr(), sums.data_ptr(), threads(m * k))
    return xq, d, sums


def intgemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int, variant: str) -> torch.Tensor:
    """x [..., K] (computed in fp32) times packed weights (int8 q [N, K] with scale [N], or int4 pairs q [N, K/2]
    with scale [N, K/group_size]) -> [..., N] fp32, in integers (csrc/intgemm.c): x quantized per row per block of
    32 to int8 (quantize_rows), int32 dots per block, scaled in fp32. q and scale contiguous; variant one of
    int_variants()."""
    _require()
    if variant not in int_variants():
        raise ValueError(f"intgemm: no variant {variant!r} for this CPU; it has {', '.join(int_variants())}")
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    rows, features, out_features = x.shape[0], shape[-1], q.shape[0]
    y = torch.empty(rows, out_features, dtype=torch.float32)
    g4 = group_size if q.dtype == torch.uint8 else 0
    _lib.intgemm(x.data_ptr(), rows, features, q.data_ptr(), q.shape[-1], scale.data_ptr(), _half(q, scale),
                 scale.shape[-1] if g4 else 1, g4, out_features, y.data_ptr(), INT_VARIANTS.index(variant),
                 int(_unpack("int4" if g4 else "int8") == "transposes"), threads(rows * features * out_features))
    return y.view(*shape[:-1], out_features)


def intgemm_experts(x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                    gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor],
                    group_size: int, variant: str) -> torch.Tensor:
    """The routed experts of a prefill in one call (csrc/intgemm.c intgemm_experts): x [T, H] (computed in fp32),
    the (token, choice) pairs sorted by expert (moe.sort_by_expert: token [P], weight [P, 1], counts [E]), stacked
    packed weights gate_up (q [E, 2I, H'], scale) and down (q [E, H, I'], scale) -> fp32 [T, H], the sum over each
    token's experts of weight * down(silu(gate) * up), each product computed as intgemm() computes it. The threads
    take whole experts; the result does not depend on their timing."""
    _require()
    if variant not in int_variants():
        raise ValueError(f"intgemm: no variant {variant!r} for this CPU; it has {', '.join(int_variants())}")
    (gq, gs), (dq, ds) = gate_up, down
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    t, h = x.shape
    e, two_i, _ = gq.shape
    token, counts = token.to(torch.int64).contiguous(), counts.to(torch.int64).contiguous()
    weight = weight.reshape(-1).float().contiguous()
    out = torch.zeros(t, h, dtype=torch.float32)
    g4 = group_size if gq.dtype == torch.uint8 else 0
    mode = "int4" if g4 else "int8"
    work = int(counts.sum()) * 3 * h * (two_i // 2)
    _lib.intgemm_experts(x.data_ptr(), t, h, two_i // 2, token.data_ptr(), weight.data_ptr(), counts.data_ptr(), e,
                         gq.data_ptr(), gs.data_ptr(), dq.data_ptr(), ds.data_ptr(), _half(gq, gs), _half(dq, ds), g4,
                         out.data_ptr(), INT_VARIANTS.index(variant), int(_unpack(mode) == "transposes"),
                         threads(work))
    return out


cpu.register("int_unpack", ("plain", "transposes"))


def _unpack(mode: str) -> str:
    """How intgemm.c unpacks `mode` weights into its tiles: "plain" (int4: gathers of 4 bytes of 8 rows; int8: 4
    bytes of one row at a time) or "transposes" (8 x 8 transposes of 32-byte pieces of 8 rows, each row read in
    order). Measured once per CPU and mode on expert-sized matrices that do not stay in cache, as a prefill's
    experts do not (Zen 5, int4: 150 vs 345 GMAC/s for 24 rows of x), and remembered."""
    return cpu.chosen("int_unpack", (mode,)) or _choose_unpack(mode)


def _choose_unpack(mode: str) -> str:
    variant = INT_VARIANTS.index(int_variants()[-1])  # the widest this CPU has
    n, k, rows = 1536, 2560, 24
    g4, width, count = (64, k // 2, 24) if mode == "int4" else (0, k, 12)
    mats = [torch.full((n, width), 0x5A, dtype=torch.uint8) for _ in range(count)]  # 47 MB: more than a cache holds
    scale = torch.full((n, k // 64), 0.01, dtype=torch.float16) if g4 else torch.full((n,), 0.01)
    x, y = torch.randn(rows, k, generator=torch.Generator().manual_seed(0)), torch.empty(rows, n)

    def run(transposed: int):
        for q in mats:
            _lib.intgemm(x.data_ptr(), rows, k, q.data_ptr(), width, scale.data_ptr(), int(bool(g4)),
                         k // 64 if g4 else 1, g4, n, y.data_ptr(), variant, transposed, threads(rows * k * n))
    return cpu.choose("int_unpack", (mode,), {"plain": lambda: run(0), "transposes": lambda: run(1)})


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps) for x [..., n] (n a multiple of 8) and weight [n], both fp32 or both
    bf16 (computed in fp32, the normalised x rounded to bf16 before the weight, as RMSNorm on bf16); one pass in C
    instead of PyTorch's ~7 small ops (60 us per call for one token on this CPU)."""
    _require()
    _check_norm("rmsnorm", x, weight, None)
    x = x.contiguous()
    out = torch.empty_like(x)
    fn = _lib.rmsnorm_bf16 if x.dtype == torch.bfloat16 else _lib.rmsnorm_f32
    fn(x.data_ptr(), weight.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps, out.data_ptr())
    return out


def _check_norm(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """x [..., n] fp32 or bf16 (n a multiple of 8), weight and bias [n] contiguous of x's dtype: a ValueError naming
    the input at fault (else memory read or written past the tensors)."""
    n = x.shape[-1]
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{op}: x is {x.dtype}; the kernel takes float32 or bfloat16")
    if n % 8:
        raise ValueError(f"{op}: {n} features; the kernel takes a multiple of 8")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (n,) or t.dtype != x.dtype or not t.is_contiguous()):
            raise ValueError(f"{op}: the {name} must be contiguous {x.dtype} [{n}], got {t.dtype} {list(t.shape)}")


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """torch.nn.LayerNorm over the last dimension of x [..., n] (n a multiple of 8; weight, bias [n] of x's dtype,
    bias None: none), fp32 or bf16 (computed in fp32 and rounded once, as LayerNorm on bf16), in one pass in C, as
    rmsnorm() for the RMSNorm families (PhiMoE's norms when decoding)."""
    _require()
    _check_norm("layernorm", x, weight, bias)
    x = x.contiguous()
    out = torch.empty_like(x)
    fn = _lib.layernorm_bf16 if x.dtype == torch.bfloat16 else _lib.layernorm_f32
    fn(x.data_ptr(), weight.data_ptr(), _ptr(bias), x.numel() // x.shape[-1], x.shape[-1], eps, out.data_ptr())
    return out


def attend(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
           keys: torch.Tensor, values: torch.Tensor, pos: int, mask: torch.Tensor | None,
           scale: float, table: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step of attention in one C call: qkv [B, (H + 2 Hkv) * D] fp32 (the fused projection's output),
    cos/sin [B, D/2] fp32; rotates q and k (interleaved pairs or halves), writes k and v at position `pos` of the
    cache keys/values [B, Hkv, T, D] (fp32, or bf16: q and k then rounded to bf16 after the rotation and the output
    too, as a bf16 model's ops round), and attends over positions 0..pos allowed by mask [B, pos + 1] (bool, None:
    all) -> [B, H * D] fp32. With table (int64 [B, n], contiguous) and positions (int64 [B]; a serving engine's
    paged cache), keys/values are blocks [N, Hkv, T, D] and row b is at position positions[b] <= pos, its position
    t in block table[b, t // T] at t % T."""
    _require()
    b, d = qkv.shape[0], keys.shape[-1]
    if qkv.stride(-1) != 1:  # rows of 5-16 come out of oneDNN transposed
        qkv = qkv.contiguous()
    out = torch.empty(b, heads * d, dtype=torch.float32)
    q = qkv.data_ptr()
    k, v = q + heads * d * 4, q + (heads + kv_heads) * d * 4
    fn = _lib.attend_bf16 if keys.dtype == torch.bfloat16 else _lib.attend_f32
    fn(q, k, v, qkv.stride(0), b, heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(), int(interleaved),
       keys.data_ptr(), values.data_ptr(), keys.shape[2], pos, _ptr(table), _tstride(table), _ptr(positions),
       _ptr(mask), 0 if mask is None else mask.stride(0), scale, out.data_ptr(), threads(b * heads * d * (pos + 1)))
    return out


def layer(norms: tuple, qkv: Mat, o: Mat, gate_up: Mat | None, down: Mat | None, heads: int, kv_heads: int,
          head_dim: int, rotation: int, scale: float, work: int, moe: Moe | None = None) -> Layer:
    """The Layer for decode_layer: norms (input weight, eps, post-attention weight, eps), or for LayerNorms the same
    and their biases (input bias, post-attention bias; of the norms' dtype), the projections (gate_up and down None
    for an MoE layer), `rotation` as gemv.c's rotate() takes it (1 ERNIE's pairs, 0 halves, 2 halves in bf16
    arithmetic), `work` the multiply-adds of its smallest projection per row (threads), `moe` the layer's MoE block
    run in the same call (None: the caller runs it); the caller keeps the tensors, Mats and Moe alive."""
    mats = [None if m is None else ctypes.pointer(m) for m in (qkv, o, gate_up, down)]
    biases = [t.data_ptr() for t in norms[4:6]] or [None, None]
    spec = Layer(norms[0].data_ptr(), norms[2].data_ptr(), norms[1], norms[3], *mats, heads, kv_heads, head_dim,
                 rotation, scale, None if moe is None else ctypes.pointer(moe), *biases)
    spec.work, spec.experts = work, None if moe is None else moe.E
    return spec


MOE_KINDS = {"ernie": 0, "sparsemixer": 1}


def moe(kind: str, router: Mat, bias: torch.Tensor | None, top_k: int, norm_min: float, jitter: float,
        gate_up: Mat, down: Mat, shared: tuple[Mat, Mat] | None) -> Moe:
    """The Moe for moe_block / layer(): routing `kind` ("ernie": softmax, top-k of probabilities + bias [E] fp32,
    renormalised with norm_min; "sparsemixer": PhiMoE's top-2 with `jitter`), the router [E, H], the stacked
    experts as Mats of one expert each (gate_up O = 2I, down O = H; the experts' matrices one after another), the
    shared experts' (gate_up, down) or None; the caller keeps the tensors and Mats alive."""
    mats = [ctypes.pointer(m) for m in (router, gate_up, down, *(shared or (None, None))) if m is not None]
    spec = Moe(MOE_KINDS[kind], mats[0], _ptr(bias), router.O, top_k, norm_min, jitter, *mats[1:])
    spec.work = gate_up.O * gate_up.wrow  # multiply-adds of one expert's gate_up per row, about
    return spec


def moe_block(spec: Moe, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixture-of-experts block for rows h [B, H] fp32 in one C call (gemv.c moe_block): routing, the chosen
    experts (each once, on the rows that chose it), the shared experts, the weighted sum, added into y [B, H] fp32
    (in place). Returns (router logits [B, E] fp32, index [B, K] int64, weights [B, K] fp32)."""
    _require()
    _widths()
    b, n = h.shape
    logits = torch.empty(b, spec.E, dtype=torch.float32)
    index, weights = torch.empty(b, spec.K, dtype=torch.int64), torch.empty(b, spec.K, dtype=torch.float32)
    _lib.moe_block(spec, h.data_ptr(), b, n, y.data_ptr(), logits.data_ptr(), index.data_ptr(), weights.data_ptr(),
                   threads(b * spec.work))
    return logits, index, weights


def decode_layer(spec: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, pos: int, mask: torch.Tensor | None, table: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A whole decoder layer for one new position per row in one C call (gemv.c decode_layer): x [B, n] fp32, or
    bf16 with a bf16 cache and every step rounded to bf16 as PyTorch's bf16 ops do (decode_layer_bf16); the rest as
    attend(). Returns (y, h, router logits): y the layer's output with a dense MLP or its MoE block in the call
    (then its router logits [B, E] fp32, else None), else the output after attention only, with h = the
    post-attention RMSNorm of y for the caller's MoE block."""
    _require()
    _widths()
    b, n = x.shape
    y, h = torch.empty_like(x), torch.empty_like(x)
    logits = None if spec.experts is None else torch.empty(b, spec.experts, dtype=torch.float32)
    fn = _lib.decode_layer_bf16 if x.dtype == torch.bfloat16 else _lib.decode_layer
    fn(spec, x.data_ptr(), b, n, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[2],
       pos, _ptr(table), _tstride(table), _ptr(positions), _ptr(mask), 0 if mask is None else mask.stride(0),
       y.data_ptr(), h.data_ptr(), _ptr(logits), threads(b * spec.work))
    return y, h, logits


class Layers:
    """What decode_layers takes for a run of layers, made once: their Layer specs and caches' pointers as C arrays
    (the caller keeps the specs and caches alive)."""

    def __init__(self, specs: list[Layer], keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.specs = (ctypes.POINTER(Layer) * len(specs))(*(ctypes.pointer(s) for s in specs))
        self.keys = (ctypes.c_void_p * len(keys))(*(k.data_ptr() for k in keys))
        self.values = (ctypes.c_void_p * len(values))(*(v.data_ptr() for v in values))
        self.count, self.T = len(specs), keys[0].shape[2]
        self.experts = [s.experts for s in specs if s.experts is not None]


def decode_layers(layers: Layers, threads_per_layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int,
                  mask: torch.Tensor | None, table: torch.Tensor | None = None,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A whole decoding step through consecutive decoder layers in one C call (gemv.c decode_layers), each as
    decode_layer computes it with its MLP or MoE block: x [B, n] -> (y [B, n], the MoE layers' router logits
    [L_moe, B, E] fp32 or None). threads_per_layer: a ctypes int array."""
    _require()
    _widths()
    b, n = x.shape
    y = torch.empty_like(x)
    logits = torch.empty(len(layers.experts), b, layers.experts[0], dtype=torch.float32) if layers.experts else None
    _lib.decode_layers(layers.specs, threads_per_layer, layers.count, int(x.dtype == torch.bfloat16), x.data_ptr(), b,
                       n, cos.data_ptr(), sin.data_ptr(), layers.keys, layers.values, layers.T, pos, _ptr(table),
                       _tstride(table), _ptr(positions), _ptr(mask), 0 if mask is None else mask.stride(0),
                       y.data_ptr(), _ptr(logits))
    return y, logits


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """int8 q [..., O, I] (scale fp32 [..., O]) or int4 pairs [..., O, I/2] (scale fp32 or fp16
    [..., O, I/group_size]) -> fp32 [..., O, I] (written into `out`, contiguous fp32, if given), converted in
    parallel at memory speed (needs available())."""
    _require()
    lib = library()
    q, scale = q.contiguous(), scale.contiguous()
    features = q.shape[-1] * (2 if q.dtype == torch.uint8 else 1)
    rows = q.numel() // q.shape[-1]
    if out is None:
        out = torch.empty(*q.shape[:-1], features, dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != rows * features:
        raise ValueError("dequantize: out must be a contiguous fp32 tensor of the weight's size")
    if q.dtype == torch.uint8:
        lib.dequant_i4(q.data_ptr(), scale.data_ptr(), _half(q, scale), rows, features, group_size, out.data_ptr(),
                       threads(rows * features))
    else:
        _half(q, scale)  # int8 scales must be fp32
        lib.dequant_i8(q.data_ptr(), scale.data_ptr(), rows, features, out.data_ptr(), threads(rows * features))
    return out


def repack(src: torch.Tensor, dst: torch.Tensor, bits: int, group_size: int = 0) -> None:
    """Stored pack-quantized codes -> moelm's packing, written into dst (needs available()): src uint8 [O, B] (the
    bytes of the stored rows, any row stride), dst [O, B] (rows contiguous): int4 (uint8 dst) from input pairs
    (2k, 2k + 1) to group halves (j, j + G/2), int8 (int8 dst) from +128 to signed. csrc/repack.c."""
    _require()
    if src.dtype != torch.uint8 or src.dim() != 2 or src.stride(1) != 1 or dst.shape != src.shape or \
            dst.dim() != 2 or dst.stride(1) != 1 or dst.dtype != (torch.uint8 if bits == 4 else torch.int8):
        raise ValueError(f"repack: src uint8 and dst of {bits}-bit codes must be [O, B] with contiguous rows, got "
                         f"{src.dtype} {list(src.shape)} and {dst.dtype} {list(dst.shape)}")
    rows, width = src.shape
    n = threads(rows * width // 8)
    if bits == 4:
        _lib.unpair_i4(src.data_ptr(), src.stride(0), dst.data_ptr(), dst.stride(0), rows, width, group_size, n)
    else:
        _lib.unsign_i8(src.data_ptr(), src.stride(0), dst.data_ptr(), dst.stride(0), rows, width, n)


def threads(work: int) -> int:
    """OpenMP threads for a call of `work` multiply-adds: torch's thread count, but never fewer than GRAIN per
    thread. A parallel region costs a fork and a barrier; on a machine whose other cores are busy, each barrier can
    wait for a descheduled thread, so small calls (tiny models, short decode steps) stay on one thread."""
    return max(1, min(torch.get_num_threads(), work // GRAIN))


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()  # callers pass contiguous CPU tensors


def _tstride(table: torch.Tensor | None) -> int:
    return 0 if table is None else table.shape[1]  # a block table [B, n], contiguous


@torch.library.custom_op("moelm::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, group_size: int,
             bias: torch.Tensor | None, select: torch.Tensor | None) -> torch.Tensor:
    return _gemv(x, weight, scale, group_size, bias, select)


@_gemv_op.register_fake
def _(x, weight, scale, group_size, bias, select):
    return x.new_empty(*x.shape[:-1], weight.shape[-2], dtype=torch.float32)
