"""The project among the packages its users have installed: run from the project's root (as the README's commands
are), Python looks in the project's folder first, so a top-level module or package named like an installed one
would shadow it. transformers 5 imports Hugging Face's `kernels` package, which a project folder `kernels/` once
shadowed (`cannot import name 'CUDAProperties' from 'kernels'`)."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# Packages of this field's environments (a project name equal to one of them shadows it): the ones the tests and
# the report metrics use, transformers' own dependencies, and the common neighbours of a CXR research set-up.
FIELD = {"transformers", "kernels", "datasets", "evaluate", "timm", "peft", "accelerate", "tokenizers", "safetensors",
         "huggingface_hub", "torch", "torchvision", "torchaudio", "triton", "monai", "torchxrayvision", "open_clip",
         "sklearn", "scipy", "numpy", "PIL", "pydicom", "sentencepiece", "sacrebleu", "rouge_score", "tqdm",
         "radgraph", "f1chexbert", "RadEval", "tensorboard", "wandb", "lightning", "pytorch_lightning", "einops",
         "xformers", "flash_attn", "pandas", "matplotlib", "cv2", "skimage", "SimpleITK", "nibabel",
         "hydra", "omegaconf", "yaml", "regex", "filelock", "packaging", "requests", "pytest"}


def top_level_names():
    """What `import NAME` finds in the project's root: modules (*.py) and regular packages (folders with
    __init__.py; a plain folder is only a namespace package, which never wins over an installed one)."""
    return {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}


def test_no_top_level_name_is_a_package_of_the_field():
    assert top_level_names() & FIELD == set(), "rename these project modules: they shadow installed packages"


def test_installed_packages_resolve_outside_the_project_from_its_root():
    """From the project's root in a fresh interpreter: transformers (with the models the tests compare against),
    peft, and the packages whose names the project once used, each resolves outside the project or is absent."""
    code = """
import importlib.util, json, sys
names = sys.argv[1:]
found = {n: getattr(importlib.util.find_spec(n), "origin", None) for n in names}
import transformers, peft
from transformers import Dinov2Model, IJepaModel, LlamaForCausalLM
found.update({f"{n} (imported)": getattr(sys.modules[n], "__file__", None) for n in names if n in sys.modules})
print(json.dumps(found))
"""
    names = ["transformers", "peft", "kernels", "datasets", "evaluate", "timm"]
    r = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["transformers"] and found["peft"]
    # a virtual environment may live in the project's folder: its site-packages are not the project's modules
    ours = {n: o for n, o in found.items() if o and Path(o).is_relative_to(ROOT) and "site-packages" not in Path(o).parts}
    assert not ours, f"resolved to the project's own files: {ours}"
