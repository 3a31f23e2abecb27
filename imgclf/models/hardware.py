"""Devices and fast inference: --gpu's device, bfloat16 where the CPU has it, batch sizes."""
import torch

from ..errors import UserError


# ---------------------------------------------------------------------------------------------
# Devices and fast inference
# ---------------------------------------------------------------------------------------------
def resolve_device(name):
    """--gpu's value -> a torch.device; an accelerator that is not there is an error, not a
    silent fall-back to the CPU."""
    if name is None or name == "cpu":
        return torch.device("cpu")
    name = "cuda" if name == "gpu" else name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--gpu {name}: no CUDA GPU is visible to PyTorch; drop --gpu to run "
                            f"on the CPU, or install a CUDA build of PyTorch and its driver")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--gpu {name}: only {torch.cuda.device_count()} CUDA device(s) "
                            f"here; use --gpu cuda:0")
        return torch.device("cuda", index)
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError("--gpu mps: Apple's MPS is not available here; drop --gpu to run on "
                            "the CPU")
        return torch.device("mps")
    raise UserError(f"--gpu {name}: unknown device; use --gpu alone (CUDA), cuda:N or mps")


def cpu_has_fast_bf16():
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flag("bf16")
    except (AttributeError, RuntimeError):
        return False


def _cpu_flag(fragment):
    try:
        with open("/proc/cpuinfo") as f:
            return any(fragment in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def autocast_dtype(device):
    """The reduced precision of inference and fine-tuning on device (None: float32): bf16 on
    CPUs with native bf16 (measured several times faster, same accuracy), bf16/fp16 on CUDA."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def precision_name(device):
    """autocast_dtype(device) as a short name: "bf16", "fp16" or "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[autocast_dtype(device)]


def keep_freed_memory():
    """Ask glibc to keep freed activation buffers instead of handing them back to the kernel
    after every batch: measured on a 2-core CPU, this removes most of the system time of a
    backbone pass and makes it up to 1.5x faster."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: its largest allowed value
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


# Batch size of inference on the CPU, and of fine-tuning's micro-batches there: small batches
# keep activations in cache (docs/design.md, "Figures behind the constants").
CPU_INFERENCE_BATCH = 16
GPU_INFERENCE_BATCH = 128


def inference_batch_size(device):
    """Images per inference batch: small on a CPU, where they stay in cache (measured)."""
    return CPU_INFERENCE_BATCH if device.type == "cpu" else GPU_INFERENCE_BATCH


def fast_forward(model, device, float32=False):
    """A function batch -> float32 outputs on the CPU, for inference: channels-last memory and
    reduced precision where the hardware does them fast (measured: 4x on an AVX512-BF16 CPU),
    unless float32 (predict.py --precision fp32)."""
    if device.type == "cpu":
        keep_freed_memory()
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    dtype = None if float32 else autocast_dtype(device)

    def forward(x):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            return model(x).float().cpu()
    return forward
