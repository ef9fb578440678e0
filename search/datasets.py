"""The datasets a recipe may name, and its `data` section: plain data, no torch.

What a recipe is checked against before anything is decoded: the names `data.dataset` accepts
(each has a loader in `search.data`, which `tests/test_data.py` holds to this list), the image
channels of the sets whose channels are known before decoding, and the MedMNIST catalog (classes,
published checksums, default flip, image counts). `AugmentCfg` is what a dataset gives as its
default augmentation and the `data` section overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from search.errors import SearchError, did_you_mean, one_of
from search.section import Section

# Every image is held decoded at data.resolution, uint8 (N, C, R, R): 3 MiB per RGB image at 1024 px,
# 48 MiB at 4096, where 10,000 images would need 480 GiB.
MAX_RESOLUTION = 1024


@dataclass(frozen=True)
class AugmentCfg:
    """Which augmentations run and how strong; datasets give defaults, recipes override."""

    crop: Literal["pad", "resized", "none"] = (
        "pad"  # 'pad': shift by up to pad_fraction of the size (zero fill); 'resized': area min_scale-1; 'none'
    )
    flip: bool = True  # horizontal, p = 0.5
    rotate: float = 0.0  # max degrees either way
    jitter: float = 0.0  # brightness and contrast factors in [1 - jitter, 1 + jitter]
    pad_fraction: float = 0.125  # 4 px at 32 px
    min_scale: float = 0.35  # random resized crop: smallest area fraction

    def scaled(self, s: float) -> AugmentCfg:
        """The same switches at strength `s` (1 = as configured, 0 = geometry only resamples)."""
        return AugmentCfg(
            self.crop,
            self.flip,
            self.rotate * s,
            min(self.jitter * s, 1.0),
            self.pad_fraction * s,
            1 - (1 - self.min_scale) * min(s, 1 / (1 - self.min_scale)),
        )


class DataCfg(Section):
    """The recipe's `data` section."""

    dataset: str = "digits"
    root: str | None = None  # data cache; default $SEARCH_DATA or the user cache dir
    resolution: int | None = Field(None, ge=8, le=MAX_RESOLUTION)  # size the data-following models see
    val_split: float = Field(0.15, gt=0, lt=1)  # carved from train when there is no official val
    test_split: float = Field(0.15, gt=0, lt=1)  # carved when there is no official test
    max_samples: int | None = Field(None, ge=10)  # stratified subsample of train
    flip: bool | None = None  # None: the dataset's default
    crop: Literal["pad", "resized", "none"] | None = None
    rotate: float | None = Field(None, ge=0, le=180)  # degrees
    jitter: float | None = Field(None, ge=0, le=1)  # brightness/contrast strength


# ---------------------------------------------------------------------------
# MedMNIST 2-D sets (search.data.medmnist reads them)

SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class MedSet:
    """One MedMNIST 2-D set: what the harness needs to know before and after downloading it."""

    classes: tuple[str, ...]
    md5: tuple[str, str, str, str]  # the published md5 of the .npz at each of SIZES
    flip: bool  # default augmentation: off where left and right are anatomy or the scan has an up
    images: int  # across the official splits (medmnist.com), for the offline checklist's size bound
    channels: int


# The three organ sets (axial, coronal, sagittal CT views) share their classes.
ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
MEDMNIST: dict[str, MedSet] = {
    "pathmnist": MedSet(
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
        (
            "a8b06965200029087d5bd730944a56c1",
            "55aa9c1e0525abe5a6b9d8343a507616",
            "ac42d08fb904d92c244187169d1fd1d9",
            "2c51a510bcdc9cf8ddb2af93af1eadec",
        ),
        True,
        107_180,
        3,
    ),
    "dermamnist": MedSet(
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        (
            "0744692d530f8e62ec473284d019b0c7",
            "b70a2f5635c6199aeaa28c31d7202e1f",
            "2defd784463fa5243564e855ed717de1",
            "8974907d8e169bef5f5b96bc506ae45d",
        ),
        True,
        10_015,
        3,
    ),
    "octmnist": MedSet(
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        (
            "c68d92d5b585d8d81f7112f81e2d0842",
            "e229e9440236b774d9f0dfef9d07bdaf",
            "0a97e76651ace45c5d943ee3f65b63ae",
            "abc493b6d529d5de7569faaef2773ba3",
        ),
        False,
        109_309,
        1,
    ),
    "pneumoniamnist": MedSet(
        ("normal", "pneumonia"),
        (
            "28209eda62fecd6e6a2d98b1501bb15f",
            "8f4eceb4ccffa70c672198ea285246c6",
            "05b46931834c231683c68f40c47b2971",
            "d6a3c71de1b945ea11211b03746c1fe1",
        ),
        False,
        5_856,
        1,
    ),
    "retinamnist": MedSet(
        ("0", "1", "2", "3", "4"),
        (
            "bd4c0672f1bba3e3a89f0e4e876791e4",
            "afda852cc34dcda56f86ad2b2457dbcc",
            "e48e916a24454daf90583d4e6efb1a18",
            "eae7e3b6f3fcbda4ae613ebdcbe35348",
        ),
        False,
        1_600,
        3,
    ),
    "breastmnist": MedSet(
        ("malignant", "normal, benign"),
        (
            "750601b1f35ba3300ea97c75c52ff8f6",
            "742edef2a1fd1524b2efff4bd7ba9364",
            "363e4b3f8d712e9b5de15470a2aaadf1",
            "b56378a6eefa9fed602bb16d192d4c8b",
        ),
        True,
        780,
        1,
    ),
    "bloodmnist": MedSet(
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        (
            "7053d0359d879ad8a5505303e11de1dc",
            "2b94928a2ae4916078ca51e05b6b800b",
            "adace1e0ed228fccda1f39692059dd4c",
            "b718ff6835fcbdb22ba9eacccd7b2601",
        ),
        True,
        17_092,
        3,
    ),
    "tissuemnist": MedSet(
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        (
            "ebe78ee8b05294063de985d821c1c34b",
            "123ece2eba09d0aa5d698fda57103344",
            "61b955355d7425a89687b06cca3ce0c2",
            "b077128c4a949f0a4eb01517f9037b9c",
        ),
        True,
        236_386,
        1,
    ),
    "organamnist": MedSet(
        ORGANS,
        (
            "68e3f8846a6bd62f0c9bf841c0d9eacc",
            "2dcccc29b88e6da5a01161ef20cda288",
            "eeae80d0a227a8d099027e1b3cfd3b60",
            "50747347e05c87dd3aaf92c49f9f3170",
        ),
        False,
        58_830,
        1,
    ),
    "organcmnist": MedSet(
        ORGANS,
        (
            "b9ceb9546e10131b32923c5bbeaea2b1",
            "3ce34a8724ea6f548e6db4744d03b6a9",
            "773c1f009daa3fe5d9a2a201b2a7ed94",
            "050f5e875dc056f6768abf94ec9995d1",
        ),
        False,
        23_583,
        1,
    ),
    "organsmnist": MedSet(
        ORGANS,
        (
            "9ab87b696fb54e2a387ebe992d6ed5f1",
            "53a6d115339d874c25e309a994ff46d3",
            "ded0c5fa01a95dc4978b956f613e9b8e",
            "b354719e553fbbb2513d5533f52a4cb1",
        ),
        False,
        25_211,
        1,
    ),
}
MULTI_LABEL = {"chestmnist": "14 findings per chest X-ray"}  # known, and refused with a reason


# ---------------------------------------------------------------------------
# every name


CIFAR_SETS = ("cifar10", "cifar100")
FOLDER = "folder:"  # folder:PATH, an image folder


def medmnist_names() -> list[str]:
    """Every MedMNIST name, multi-label ones included: `flag` (28 px) and `flag_SIZE`."""
    return [flag if size == 28 else f"{flag}_{size}" for flag in (*MEDMNIST, *MULTI_LABEL) for size in SIZES]


def medmnist_parts(name: str) -> tuple[str, int]:
    """'pathmnist_64' -> ('pathmnist', 64); a bare flag is the 28 px set."""
    flag, _, size = name.partition("_")
    return flag, int(size) if size else 28


def names() -> list[str]:
    """Every named set `data.dataset` accepts (multi-label ones included, refused when checked), image
    folders aside."""
    return ["digits", *CIFAR_SETS, "galaxy10", *medmnist_names()]


# Image channels of the sets whose channels are known before decoding (not image folders).
CHANNELS: dict[str, int] = {
    "digits": 1,
    **dict.fromkeys(CIFAR_SETS, 3),
    "galaxy10": 3,
    **{
        name: MEDMNIST[medmnist_parts(name)[0]].channels
        for name in medmnist_names()
        if medmnist_parts(name)[0] in MEDMNIST
    },
}


def channels(cfg: DataCfg) -> int | None:
    """The dataset's image channels, known for the named sets; None for an image folder."""
    return CHANNELS.get(cfg.dataset)


def dataset_names() -> list[str]:
    """Every name `data.dataset` accepts, MedMNIST sizes folded (`pathmnist[_64|_128|_224]`)."""
    sizes = "[" + "|".join(f"_{s}" for s in SIZES[1:]) + "]"
    plain = [k for k in names() if k not in medmnist_names()]
    return [*plain, *(f"{flag}{sizes}" for flag in MEDMNIST), f"{FOLDER}PATH"]


def check_name(name: str) -> None:
    """Refuses a `data.dataset` that names no set (a close match and the allowed names in the message)."""
    if name.startswith(FOLDER) or name in names():
        return
    raise SearchError(
        f"data.dataset: unknown dataset '{name}'{did_you_mean(name, [*names(), 'folder'])}; "
        f"allowed: {one_of(dataset_names())}"
    )
