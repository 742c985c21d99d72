"""Load a Hugging Face causal LM from a local directory straight onto the default device, tensor by tensor.

transformers' own ``from_pretrained`` refuses a target device (``device_map`` or a ``torch.device`` context, which
is how Lightning's ``configure_model`` places new tensors) unless `accelerate` is installed, and without one it
builds on the host first. Here the model is made on the default device with its random init skipped, and each
safetensors tensor is read from the memory-mapped file and copied into its parameter on that device: the host never
holds more than one tensor, and there is no fp32 copy of a bf16 model.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from lit_optim.errors import MissingPathError


def _shards(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    files = [os.path.join(path, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise MissingPathError(
            f"model.pretrained={path!r} has no usable weights "
            f"({'missing: ' + ', '.join(missing) if missing else 'no *.safetensors files'}). "
            "Give a directory saved with save_pretrained(..., safe_serialization=True)."
        )
    return files


def load_pretrained(path: str, dtype: torch.dtype) -> nn.Module:
    import transformers
    from safetensors import safe_open
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingPathError(
            f"model.pretrained={path!r} has no config.json; it is not a Hugging Face model directory.")
    files = _shards(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    with no_init_weights():  # every weight is overwritten below; initialising 8B parameters first is wasted time
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    targets = model.state_dict(keep_vars=True)
    device = next(iter(targets.values())).device
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    target = targets.get(key)
                    if target is None:
                        unexpected.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    if tensor.shape != target.shape:
                        raise MissingPathError(
                            f"model.pretrained={path!r}: {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                            f"{tuple(target.shape)} in the model its config.json describes; the directory is "
                            "inconsistent."
                        )
                    target.copy_(tensor)
                    loaded.add(key)
    # Tied weights (lm_head = embedding) are saved once; they count as loaded through the tensor they share.
    loaded_storage = {targets[k].data_ptr() for k in loaded}
    missing = [k for k, t in targets.items() if k not in loaded and t.data_ptr() not in loaded_storage]
    if missing:
        raise MissingPathError(
            f"model.pretrained={path!r} lacks {len(missing)} of the model's tensors (e.g. {', '.join(missing[:3])}); "
            "it is not a complete checkpoint of this architecture."
        )
    if unexpected:
        import logging

        logging.getLogger("lit_optim").warning(
            "model.pretrained: %d checkpoint tensors the model does not use were skipped (e.g. %s)",
            len(unexpected), ", ".join(unexpected[:3]))
    model.train()  # the task trains it; from_config and from_pretrained may leave eval mode
    return model
