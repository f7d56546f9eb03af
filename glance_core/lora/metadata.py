"""The Glance metadata schema, stored as one JSON string under the safetensors header key "glance"."""
import json
from dataclasses import asdict, dataclass, field

from .. import __version__
from ..errors import LoraFileError
from ..schedule import PHASES

HEADER_KEY = "glance"
SCHEMA_VERSION = 1


@dataclass
class GlanceMeta:
    """What a Glance LoRA file says about itself. Sigmas are in [0, 1], not timesteps."""
    phase: str                      # "slow" or "fast"
    family: str                     # family preset name, e.g. "qwen-image"
    sigmas: list                    # the sigmas this LoRA was trained at
    rank: int
    alpha: float
    target_modules: list
    schedule: dict = None           # Schedule.to_dict() of the whole pair
    image_sha256: str = None        # hash of the training image's pixels
    pack_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)  # free-form additions (training settings, notes)

    def validate(self, path="<metadata>"):
        """Raise LoraFileError (naming `path`) if a field is missing or malformed; returns self."""
        def bad(why):
            raise LoraFileError(path, f"bad Glance metadata: {why}")
        if self.phase not in PHASES:
            bad(f"phase must be one of {PHASES}, got {self.phase!r}")
        if not isinstance(self.family, str) or not self.family:
            bad("family missing")
        if not isinstance(self.sigmas, list) or not self.sigmas or \
                not all(isinstance(s, (int, float)) and 0 <= s <= 1 for s in self.sigmas):
            bad("sigmas must be a non-empty list of numbers in [0, 1]")
        if not isinstance(self.rank, int) or self.rank < 1:
            bad(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            bad(f"alpha must be positive, got {self.alpha!r}")
        if not isinstance(self.target_modules, list):
            bad("target_modules must be a list")
        return self

    def to_header(self):
        """safetensors metadata entries (strings only) for this record."""
        d = asdict(self)
        # kohya-style keys too, so other tools show rank and alpha.
        return {HEADER_KEY: json.dumps(d, sort_keys=True), "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha)}

    @classmethod
    def from_header(cls, metadata, path="<metadata>"):
        """Parse the record from safetensors metadata; None if the file has none."""
        raw = (metadata or {}).get(HEADER_KEY)
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise LoraFileError(path, f"bad Glance metadata: not valid JSON ({e})") from None
        version = d.get("schema_version")
        if not isinstance(version, int):
            raise LoraFileError(path, "bad Glance metadata: no schema_version")
        if version > SCHEMA_VERSION:
            raise LoraFileError(path, f"Glance metadata schema {version} is newer than this pack understands "
                                      f"({SCHEMA_VERSION}); update Glance for ComfyUI")
        known = set(cls.__dataclass_fields__)
        missing = {"phase", "family", "sigmas", "rank", "alpha", "target_modules"} - set(d)
        if missing:
            raise LoraFileError(path, f"bad Glance metadata: missing {', '.join(sorted(missing))}")
        extra = dict(d.get("extra") or {})
        extra.update({k: v for k, v in d.items() if k not in known})  # keep unknown fields, never drop
        fields = {k: v for k, v in d.items() if k in known and k != "extra"}
        return cls(**fields, extra=extra).validate(path)
