"""The weather function the tool tests call, in each API's shape (one definition)."""

from __future__ import annotations

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
_DESCRIPTION = "The current weather in a city."

CHAT_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": _DESCRIPTION, "parameters": WEATHER_PARAMETERS}}
RESPONSES_WEATHER = {"type": "function", "name": "get_weather", "description": _DESCRIPTION, "parameters": WEATHER_PARAMETERS}
MESSAGES_WEATHER = {"name": "get_weather", "description": _DESCRIPTION, "input_schema": WEATHER_PARAMETERS}
