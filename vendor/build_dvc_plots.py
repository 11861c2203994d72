"""Builds vendor/dvc_plots.html: DVC's plots page with vega, vega-lite and vega-embed inlined, so
`dvc plots show` / `dvc plots diff` open offline (DVC's own page loads them from a CDN).

    python vendor/build_dvc_plots.py          # needs the npm registry once; the output is committed

The versions are the ones DVC's renderer (dvc-render) is written against; each tarball is checked
against its npm integrity hash before use. .dvc/config points `plots.html_template` at the page.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

PACKAGES = {  # name: (version, file in the tarball)
    "vega": ("5.20.2", "package/build/vega.min.js"),
    "vega-lite": ("5.2.0", "package/build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "package/build/vega-embed.min.js"),
}
OUT = Path(__file__).with_name("dvc_plots.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined (BSD-3-Clause, see vendor/LICENSES.md): no CDN -->
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(name: str, version: str, member: str) -> str:
    meta = json.load(urllib.request.urlopen(f"https://registry.npmjs.org/{name}/{version}", timeout=60))
    blob = urllib.request.urlopen(meta["dist"]["tarball"], timeout=120).read()
    algo, digest = meta["dist"]["integrity"].split("-", 1)
    if base64.b64encode(hashlib.new(algo, blob).digest()).decode() != digest:
        raise SystemExit(f"{name}@{version}: the tarball does not match its npm integrity hash")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        text = tar.extractfile(member).read().decode("utf-8")
    # no source-map fetch when developer tools open; no closing tag inside the inlined code
    text = "\n".join(line for line in text.splitlines() if not line.startswith("//# sourceMappingURL="))
    return text.replace("</script", "<\\/script")


def main() -> None:
    scripts = [f'    <script type="text/javascript">/* {n}@{v} */\n{fetch(n, v, m)}\n    </script>'
               for n, (v, m) in PACKAGES.items()]
    OUT.write_text(PAGE % "\n".join(scripts), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
