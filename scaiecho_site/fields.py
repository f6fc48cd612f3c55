"""Request fields shared by the apps' serializers."""

from __future__ import annotations

import re
from typing import Any

from rest_framework import serializers


class WholeNumber(serializers.IntegerField):
    """An integer written as one: DRF's ``IntegerField`` also takes "0.0" and "2.0", which the
    schema (type integer) does not allow. Form fields arrive as strings, so this is where it shows."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, str) and not re.fullmatch(r"[+-]?\d+", data.strip()):
            self.fail("invalid")
        return super().to_internal_value(data)
