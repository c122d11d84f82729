"""placeholder"""
from dataclasses import dataclass
@dataclass(frozen=True)
class ProfileSpec:
    x: int = 0
