"""A ScanResult and the token viewer shown inline in a Jupyter notebook, executed for real with nbclient on an
ipykernel running this interpreter (tiny:llama, random weights).

These tests fail (never skip) when nbclient, nbformat or ipykernel is missing: they are test extras
(pip install -e ".[test]"). The kernel is ipykernel's own "python3" kernelspec, which pip installs into the
environment (<prefix>/share/jupyter/kernels/python3, argv "python -m ipykernel_launcher"); jupyter_client
replaces that bare "python" with sys.executable, so no `ipykernel install` step is needed.
"""

from __future__ import annotations

import base64
import html
import json
import re
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from conftest import EPS, MIN_ROWS, TEXTS

KERNEL = "python3"

CELLS = {
    "import": "import sys, matplotlib\n"
              "before = matplotlib.get_backend()\n"
              "import catchtag\n"
              "print('BACKEND', before, '->', matplotlib.get_backend())\n"
              "print('PREFIX', sys.prefix)",
    "load": "import torch\ntorch.set_num_threads(2)\n"
            "net, tok = catchtag.load_model('tiny:llama', device='cpu', dtype='float32')",
    "scan": f"r = catchtag.scan(net, tok, {TEXTS[:2]!r}, eps={EPS}, min_rows={MIN_ROWS}, progress=False,\n"
            "                  model_name='tiny:llama')\n"
            "print('SINKS', int(r.heads['n_sinks'].sum()))\n"
            "r",
    "view": f"catchtag.show_tokens(net, tok, {TEXTS[0]!r}, eps={EPS}, min_rows={MIN_ROWS}, name='tiny:llama')",
    "after": "print('BACKEND_END', matplotlib.get_backend())",
}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after running every cell: {cell name: outputs}."""
    folder = tmp_path_factory.mktemp("notebook")
    nb = new_notebook(cells=[new_code_cell(src, metadata={"name": name}) for name, src in CELLS.items()])
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120, allow_errors=True,
                            resources={"metadata": {"path": str(folder)}})
    client.execute()
    nbformat.write(nb, folder / "catchtag.ipynb")  # kept for a look when a test fails
    return {cell.metadata["name"]: cell.outputs for cell in nb.cells}


def printed(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout")


def result_html(outputs) -> str:
    shown = [o["data"]["text/html"] for o in outputs if o["output_type"] in ("execute_result", "display_data")
             and "text/html" in o.get("data", {})]
    assert len(shown) == 1, f"expected one HTML output, got {outputs}"
    return shown[0]


def test_kernel_is_this_interpreter():
    """The python3 kernelspec nbclient uses starts this very interpreter (so the kernel imports this catchtag)."""
    assert KERNEL in KernelSpecManager().find_kernel_specs(), "no python3 kernelspec: pip install ipykernel"
    cmd = KernelManager(kernel_name=KERNEL).format_kernel_cmd()
    assert cmd[0] == sys.executable, (cmd, sys.executable)


def test_no_cell_errors(executed):
    errors = {name: "\n".join(o.get("traceback", [])) for name, outs in executed.items()
              for o in outs if o["output_type"] == "error"}
    assert not errors, errors
    assert printed(executed["import"]).splitlines()[-1] == f"PREFIX {sys.prefix}"


def test_import_keeps_matplotlib_backend(executed):
    m = re.search(r"^BACKEND (\S+) -> (\S+)$", printed(executed["import"]), re.M)
    assert m, executed["import"]
    assert m.group(1) == m.group(2)
    # showing a ScanResult and the viewer draws with matplotlib, but outside pyplot: the backend stays
    assert printed(executed["after"]).strip() == f"BACKEND_END {m.group(1)}"


def test_scan_result_inline(executed):
    assert int(re.search(r"SINKS (\d+)", printed(executed["scan"])).group(1)) > 0
    page = result_html(executed["scan"])
    assert "catchtag ScanResult" in page and "2 prompts" in page
    png = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert png, page[:500]
    assert base64.b64decode(png.group(1)).startswith(b"\x89PNG\r\n\x1a\n")


def test_token_viewer_inline(executed):
    frame = result_html(executed["view"])
    assert frame.startswith("<iframe ") and "<script" not in frame, "the page is escaped into srcdoc"
    page = html.unescape(re.search(r'srcdoc="([^"]*)"', frame).group(1))
    assert page.startswith("<!DOCTYPE html>") and "<title>catchtag viewer: tiny:llama</title>" in page
    data = json.loads(re.search(r'<script id="catchtag-data" type="application/json">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))
    assert data["model"] == "tiny:llama" and data["eps"] == EPS and data["min_rows"] == MIN_ROWS
    assert len(data["heads"]) == data["n_layers"] and len(data["tokens"]) > 10
    assert any(h and h["s"] for layer in data["heads"] for h in layer), "some head has a sink"
