"""The Glance metadata schema, stored as one JSON string under the safetensors header key "glance"."""
import json
import math
from dataclasses import asdict, dataclass, field

from .. import __version__
from ..errors import GlanceError, LoraFileError
from ..families import get_family
from ..schedule import PHASES, Schedule, check_stored
from .safefile import json_object

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
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not isinstance(self.phase, str) or self.phase not in PHASES:
            bad(f"phase must be one of {PHASES}, got {self.phase!r}")
        if not isinstance(self.family, str) or not self.family:
            bad("family missing")
        try:
            get_family(self.family)
        except GlanceError as e:
            bad(str(e))
        if not isinstance(self.sigmas, list) or not self.sigmas or len(self.sigmas) > 1000 or \
                not all(number(s) and 0 <= s <= 1 for s in self.sigmas):
            bad("sigmas must be a non-empty list of at most 1000 numbers in [0, 1]")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            bad(f"rank must be a positive integer, got {self.rank!r}")
        if not number(self.alpha) or self.alpha <= 0:
            bad(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not isinstance(self.target_modules, list) or not all(isinstance(t, str) for t in self.target_modules):
            bad("target_modules must be a list of module names")
        if not isinstance(self.extra, dict):
            bad("extra must be a JSON object")
        if self.schedule is not None:
            if not isinstance(self.schedule, dict):
                bad("schedule must be a JSON object")
            try:
                sched = check_stored(self.schedule)
            except GlanceError as e:
                bad(f"schedule: {e}")
            if sched.family != get_family(self.family).name:
                bad(f"schedule is for family {sched.family!r} but the file says {self.family!r}")
            if self.phase in PHASES and not _close(sched.phase_sigmas(self.phase), self.sigmas):
                bad(f"sigmas {self.sigmas} are not the schedule's {self.phase} sigmas")
        return self

    def stored_schedule(self):
        """The pair's schedule as recorded at training (a Schedule), or None if the file records none."""
        return None if self.schedule is None else Schedule.from_dict(self.schedule)

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
        d = json_object(raw, path, "Glance metadata")
        version = d.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise LoraFileError(path, "bad Glance metadata: no schema_version")
        if version > SCHEMA_VERSION:
            raise LoraFileError(path, f"Glance metadata schema {version} is newer than this pack understands "
                                      f"({SCHEMA_VERSION}); update Glance for ComfyUI")
        known = set(cls.__dataclass_fields__)
        missing = {"phase", "family", "sigmas", "rank", "alpha", "target_modules"} - set(d)
        if missing:
            raise LoraFileError(path, f"bad Glance metadata: missing {', '.join(sorted(missing))}")
        extra = d.get("extra") or {}
        if not isinstance(extra, dict):
            raise LoraFileError(path, "bad Glance metadata: extra must be a JSON object")
        extra = dict(extra)
        extra.update({k: v for k, v in d.items() if k not in known})  # keep unknown fields, never drop
        fields = {k: v for k, v in d.items() if k in known and k != "extra"}
        return cls(**fields, extra=extra).validate(path)


def _close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 for x, y in zip(a, b))
