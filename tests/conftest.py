import os

from hypothesis import HealthCheck, settings

# The CUDA tests run in Numba's CUDA simulator unless the caller chose otherwise
# (benchmarks/gpu_check.sh sets NUMBA_ENABLE_CUDASIM=0 to run them on a GPU). Numba
# reads the variable once, when numba.cuda is first imported, so it is set here.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
