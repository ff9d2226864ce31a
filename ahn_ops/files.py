"""Reading the JSON files of checkpoints, with errors that name the file (no dependency beyond the stdlib)."""

from __future__ import annotations

import json
import os
from typing import Dict, Union


def read_json_object(path: Union[str, os.PathLike]) -> Dict:
    """The JSON object in ``path``; a ValueError naming the file if it is not valid JSON or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data
