"""One FastAPI router per family: the OpenAI paths it serves, as thin formatters over its handle."""
