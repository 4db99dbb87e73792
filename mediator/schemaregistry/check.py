"""``mediator check``: the registry subjects a config names exist, when its registry answers.

The registry is the daemon's own (``[registry]``), so ``check`` asks it over HTTP at the URL events'
``dataschema`` names: a running daemon answers; when nothing answers (the daemon is not running, this
is another machine) the subjects cannot be verified, which is a warning, not an error.
"""

from __future__ import annotations

from urllib.parse import quote

import aiohttp

from mediator.config import Config
from mediator.schemaregistry.http import base_url

TIMEOUT_S = 3.0


def named_subjects(config: Config) -> list[tuple[str, str, int | str]]:
    """(key path, subject, version) of every registry subject the config names."""
    return [
        (f"schemas[{i}].schema", s.registry.subject, s.registry.version)
        for i, s in enumerate(config.root.schemas)
        if s.registry is not None
    ]


async def subject_problems(config: Config) -> tuple[list[str], list[str]]:
    """(problems, warnings): a subject or version the registry does not have is a problem; a registry that
    does not answer, or refuses this anonymous caller, is a warning."""
    named = named_subjects(config)
    cfg = config.root.registry
    if not named or not cfg.enabled:
        return [], []
    listener = config.adapters["http"].listeners[cfg.listener]
    url = base_url(cfg, listener)
    problems: list[str] = []
    try:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for where, subject, version in named:
                target = f"{url}/subjects/{quote(subject, safe='')}/versions/{version}"
                async with http.get(target) as resp:
                    if resp.status in (401, 403):
                        return problems, [f"the registry at {url} refused an anonymous look-up: subjects not verified"]
                    if resp.status == 404:
                        body = await resp.json(content_type=None)
                        message = body.get("message", "not found") if isinstance(body, dict) else "not found"
                        problems.append(
                            f"{where}: the registry at {url} has no {subject!r} version {version}: {message}"
                        )
                    elif resp.status != 200:
                        return problems, [f"the registry at {url} answered {resp.status}: subjects not verified"]
    except (aiohttp.ClientError, TimeoutError) as exc:
        return [], [f"the registry at {url} is not reachable ({type(exc).__name__}): registry subjects not verified"]
    return problems, []
