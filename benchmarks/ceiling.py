"""What the device reaches today: a large matmul (TFLOP/s) and a device-to-device copy (GB/s).

Kernel figures are reported as fractions of these, measured in the same process, so a number
from a throttled or shared GPU still reads right.

    python -m benchmarks.ceiling
"""

from __future__ import annotations

import torch

from benchmarks.common import device_name, measure, write_results


def copy_bandwidth_gbs(device: torch.device, numel: int, warmup: int = 3, reps: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), the achievable ceiling."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), warmup=warmup, reps=reps)
    return 2 * src.numel() * src.element_size() / (t["median_ms"] * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, warmup: int = 3, reps: int = 10) -> float:
    """Dense n×n×n matmul throughput, the compute ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, warmup=warmup, reps=reps)
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12


def probe(device: torch.device | None = None) -> dict[str, float | str]:
    """The ceilings of ``device``: bf16 matmul and 1 GiB copy on GPU, small fp32 ones on CPU."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    return {
        "device": device_name(device),
        "matmul_dtype": "bf16" if gpu else "fp32",
        "matmul_tflops": matmul_tflops(
            device, 8192 if gpu else 512, torch.bfloat16 if gpu else torch.float32
        ),
        "copy_gbs": copy_bandwidth_gbs(device, 1 << 28 if gpu else 1 << 22),
    }


if __name__ == "__main__":
    print(write_results("ceiling", [probe()]))
