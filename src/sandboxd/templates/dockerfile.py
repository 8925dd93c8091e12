"""Dockerfile + context directory → :class:`BuildSpec` and cached COPY files, for the CLI.

Deliberately the e2b SDK's own code: ``Template().from_dockerfile()`` (BuildKit's parser, E2B's
rules for USER/WORKDIR defaults, ARG, CMD/ENTRYPOINT → start command), ``Template.to_json()``
(the steps with their ``filesHash``) and the SDK's context tarball (``.dockerignore`` honoured).
So ``sandboxd template build -f Dockerfile`` sends the builder exactly what ``Template.build``
sends over the API, and both give the same build id for the same Dockerfile and context.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from sandboxd.templates.files import FilesCache, FilesError
from sandboxd.templates.spec import BuildSpec


def spec_from_dockerfile(dockerfile: Path, context: Path) -> BuildSpec:
    """The build spec the SDK would send for this Dockerfile and context."""
    from e2b import Template

    template = Template(file_context_path=str(context))
    with contextlib.redirect_stdout(sys.stderr):  # the converter prints its warnings
        builder = template.from_dockerfile(dockerfile.read_text())
        body = json.loads(Template.to_json(builder))
    return BuildSpec.from_json(body)


def cache_context_files(spec: BuildSpec, context: Path, files: FilesCache) -> int:
    """Put the tar of every COPY step's files into the cache unless a verified one is there
    (what the SDK's upload does); returns how many were written."""
    from e2b.template.utils import read_dockerignore, tar_file_stream

    ignore = read_dockerignore(str(context))
    written = 0
    for step in spec.steps:
        if step.type != "COPY" or step.files_hash is None:
            continue
        if files.present(step.files_hash):
            with contextlib.suppress(FilesError):
                files.verified(step.files_hash, step.args[0], step.args[1])
                continue
        with tar_file_stream(step.args[0], str(context), ignore, False, False) as tar:
            files.put(step.files_hash, tar)
        written += 1
    return written
