"""Every in-tree plugin type, registered by importing its module (the one list, as the
reference runner keeps it). Import this module before loading a configuration."""

from __future__ import annotations

import igw.datalayer.extractors
import igw.datalayer.sources
import igw.flowcontrol.saturation
import igw.parsing.openai
import igw.parsing.passthrough
import igw.parsing.token_producer
import igw.scheduling.plugins  # noqa: F401  (every scheduling plugin module)
