"""mupfast: a μP-native, Triton-kernel-backed LLM trainer on DeepSpeed ZeRO."""

from __future__ import annotations


def _find_checkout_kernels() -> None:
    """Make ``mupfast.kernels`` the checkout's top-level ``kernels/`` folder in an editable install.

    ``kernels/`` has no ``__init__.py`` on purpose: a namespace folder is outranked by any installed
    regular package of the same name, so ``import kernels`` with the checkout's root on ``sys.path``
    (python or pytest started there) finds Hugging Face's ``kernels``, which transformers imports,
    never ours. A wheel installs the folder as ``mupfast/kernels``; setuptools' editable finder maps
    only regular packages, so an editable checkout registers the namespace here.
    """
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    checkout = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (checkout / "runtime.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(checkout)]
    sys.modules[spec.name] = globals()["kernels"] = importlib.util.module_from_spec(spec)


_find_checkout_kernels()
