"""Screenshots of workflows loaded in ComfyUI's real frontend, and a layout check of each.

Starts ComfyUI on 127.0.0.1 (a sandbox base directory with this pack linked in, as the host tests make it),
opens its frontend in headless Chromium through playwright-core, loads each workflow with
``app.loadGraphData`` and writes ``<out>/<workflow>.png``. For every workflow it reports node types the
frontend does not know, any dialog that opened (e.g. "missing node types"), nodes whose saved size is smaller
than what the frontend computes for their widgets (the frontend grows them on load) and nodes that cover each
other (title bars included). Exit status 1 when any of these is found.

Needs: Chromium (Debian: ``apt-get install chromium``), Node.js and playwright-core (``npm install
playwright-core`` in some folder; pass it with --node-modules), and ComfyUI (COMFYUI_PATH). Run with
ComfyUI's Python::

    COMFYUI_PATH=/path/to/ComfyUI python docs/screenshots/take.py --node-modules /tmp/shot/node_modules \
        [--thumbnails] [--out docs/screenshots] [workflow.json ...]

``--thumbnails`` also writes ``<name>.jpg`` next to each workflow (the template browser's picture).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))

DRIVER = r"""
const { chromium } = require('playwright-core');
const [url, specPath] = process.argv.slice(2);
const spec = JSON.parse(require('fs').readFileSync(specPath, 'utf8'));

(async () => {
  const browser = await chromium.launch({
    executablePath: spec.chromium, headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'],
  });
  const reports = [];
  for (const item of spec.workflows) {  // a fresh profile each: no workflow tabs left from the one before
    const context = await browser.newContext({ viewport: { width: spec.width, height: spec.height }, deviceScaleFactor: 1 });
    const page = await context.newPage();
    const console_errors = [], start_errors = [];
    let loading = false;
    page.on('pageerror', (e) => (loading ? console_errors : start_errors).push(String(e.stack || e).slice(0, 400)));
    await page.goto(url, { waitUntil: 'load' });
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph && window.app.canvas, null, { timeout: 120000 });
    await page.waitForTimeout(2500);  // the default graph, settings, extensions
    // close whatever opened on start (templates, release notes) so that only the workflow's own dialogs remain
    await page.keyboard.press('Escape');
    await page.evaluate(() => document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click()));
    await page.waitForTimeout(500);
    const workflow = JSON.parse(require('fs').readFileSync(item.path, 'utf8'));
    loading = true;
    const report = await page.evaluate(async ({ workflow, name }) => {
      const types = [...new Set(workflow.nodes.map((n) => n.type))];
      const unknown = types.filter((t) => !(t in LiteGraph.registered_node_types));
      await app.loadGraphData(workflow, true, true, name);
      await new Promise((r) => setTimeout(r, 800));
      const saved = Object.fromEntries(workflow.nodes.map((n) => [n.id, n.size]));
      const nodes = app.graph.nodes.map((n) => {
        const b = new Float32Array(4);
        n.getBounding(b);
        return { id: n.id, type: n.type, title: n.title, saved: saved[n.id], size: [...n.size],
                 computed: [...n.computeSize()], bounding: [...b],
                 widgets: (n.widgets || []).map((w) => w.name) };
      });
      const too_small = nodes.filter((n) => n.saved && (n.computed[0] > n.saved[0] + 0.5 || n.computed[1] > n.saved[1] + 0.5))
        .map((n) => ({ id: n.id, title: n.title, saved: n.saved, computed: n.computed.map(Math.ceil) }));
      const overlaps = [];
      for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
        const [ax, ay, aw, ah] = nodes[i].bounding, [bx, by, bw, bh] = nodes[j].bounding;
        const dx = Math.min(ax + aw, bx + bw) - Math.max(ax, bx), dy = Math.min(ay + ah, by + bh) - Math.max(ay, by);
        if (dx > 0 && dy > 0) overlaps.push([nodes[i].title, nodes[j].title, Math.round(dx), Math.round(dy)]);
      }
      return { unknown, nodes, too_small, overlaps };
    }, { workflow, name: item.name });
    await page.waitForTimeout(1000);  // loadGraphData's own fit-to-view, DOM widgets
    // zoom so that the graph fills the canvas next to the menus (the default fit leaves wide margins)
    report.graph_box = await page.evaluate(({ left, top, margin }) => {
      const boxes = app.graph.nodes.map((n) => { const b = new Float32Array(4); n.getBounding(b); return b; });
      const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
      const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
      const canvas = app.canvas.canvas.getBoundingClientRect();
      const ds = app.canvas.ds;
      ds.scale = Math.min((canvas.width - left - 2 * margin) / (x1 - x0), (canvas.height - top - 2 * margin) / (y1 - y0), 1.25);
      ds.offset = [(left + margin) / ds.scale - x0, (top + margin) / ds.scale - y0];
      app.canvas.setDirty(true, true);
      const s = (x, y) => [Math.round((x + ds.offset[0]) * ds.scale + canvas.left), Math.round((y + ds.offset[1]) * ds.scale + canvas.top)];
      return [...s(x0, y0), ...s(x1, y1)];
    }, { left: spec.left, top: spec.top, margin: 16 });
    await page.waitForTimeout(1000);
    report.dialogs = await page.evaluate(() => [...document.querySelectorAll('.p-dialog')]
      .filter((d) => d.offsetParent !== null).map((d) => d.innerText.slice(0, 600)));
    report.toasts = await page.evaluate(() => [...document.querySelectorAll('.p-toast-message')].map((d) => d.innerText.slice(0, 300)));
    report.console_errors = console_errors;
    report.start_errors = start_errors;  // the frontend's own, before any workflow was loaded: reported, not a failure
    if (item.screenshot) await page.screenshot({ path: item.screenshot });
    report.name = item.name;
    reports.push(report);
    await context.close();
  }
  await browser.close();
  process.stdout.write(JSON.stringify(reports));
})().catch((e) => { console.error(e); process.exit(2); });
"""

SETTINGS = {  # a fresh user: no first-run templates dialog, no minimap over the graph
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
}


# Model folder of each loader, and how many of its first widgets name a file there.
LOADER_FOLDERS = {
    "CheckpointLoaderSimple": ("checkpoints", 1), "ESDApplyErasure": ("erasures", 1),
    "UNETLoader": ("diffusion_models", 1), "DualCLIPLoader": ("text_encoders", 2), "VAELoader": ("vae", 1),
}


def placeholder_models(base: str, workflows: list[str]) -> None:
    """Empty files under the names the workflows pick, so their combos show a listed model."""
    for path in workflows:
        with open(path) as handle:
            workflow = json.load(handle)
        for node in workflow["nodes"]:
            values = node.get("widgets_values") or []
            if node["type"] in LOADER_FOLDERS:
                folder, count = LOADER_FOLDERS[node["type"]]
                files = [(folder, name) for name in values[:count]]
            elif node["type"] == "ESDLoadErasedUNet" and values:
                folder, _, name = values[0].partition("/")
                files = [(folder, name)]
            else:
                continue
            for folder, name in files:
                target = os.path.join(base, "models", folder, name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()


def shrink_png(path: str, limit: int) -> None:
    """Quantize a screenshot to a palette when it is over ``limit`` bytes (UI pictures lose nothing visible)."""
    from PIL import Image

    if os.path.getsize(path) <= limit:
        return
    image = Image.open(path).convert("RGB")
    for colors in (256, 128, 64):
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if os.path.getsize(path) <= limit:
            return


def thumbnail(png: str, jpg: str, box: list[int], width: int = 640) -> None:
    """The template browser's picture: the screenshot cropped to the graph (``box``, no menus), ``width`` wide."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    margin = 8
    image = image.crop((max(0, box[0] - margin), max(0, box[1] - margin), min(image.width, box[2] + margin),
                        min(image.height, box[3] + margin)))
    height = round(image.height * width / image.width)
    image.resize((width, height), Image.LANCZOS).save(jpg, quality=85, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workflows", nargs="*")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "screenshots"))
    parser.add_argument("--suffix", default="", help="added to each PNG's name, e.g. '-before'")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--node-modules", default=os.environ.get("NODE_PATH", ""), help="folder holding playwright-core")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--max-png-bytes", type=int, default=200_000)
    parser.add_argument("--thumbnails", action="store_true", help="also write <workflow>.jpg next to each workflow")
    parser.add_argument("--no-screenshots", action="store_true", help="only check")
    args = parser.parse_args()
    workflows = [os.path.abspath(p) for p in args.workflows] or sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))

    import comfy_env

    base = comfy_env.base_directory()
    placeholder_models(base, workflows)
    settings = os.path.join(base, "user", "default", "comfy.settings.json")
    os.makedirs(os.path.dirname(settings), exist_ok=True)
    with open(settings, "w") as handle:
        json.dump(SETTINGS, handle)
    os.makedirs(args.out, exist_ok=True)
    items = []
    for path in workflows:
        name = os.path.splitext(os.path.basename(path))[0]
        shot = None if args.no_screenshots else os.path.join(args.out, f"{name}{args.suffix}.png")
        items.append({"path": path, "name": name, "screenshot": shot})
    server = comfy_env.ComfyServer(base).start()
    try:
        with tempfile.TemporaryDirectory() as folder:
            driver, spec = os.path.join(folder, "driver.js"), os.path.join(folder, "spec.json")
            with open(driver, "w") as handle:
                handle.write(DRIVER)
            with open(spec, "w") as handle:
                json.dump({"chromium": args.chromium, "width": args.width, "height": args.height, "workflows": items,
                           "left": 64, "top": 80}, handle)  # the side bar, the tab and menu bars
            env = {**os.environ, "NODE_PATH": args.node_modules}
            done = subprocess.run(["node", driver, server.url, spec], env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 2
            reports = json.loads(done.stdout)
    finally:
        server.stop()

    failed = False
    for item, report in zip(items, reports):
        problems = {key: report[key] for key in ("unknown", "dialogs", "too_small", "overlaps", "console_errors") if report[key]}
        failed |= bool(problems)
        print(f"{item['name']}: {'OK' if not problems else json.dumps(problems, indent=1)}")
        if report["start_errors"]:
            print(f"  (frontend errors on start, before loading: {report['start_errors']})")
        if item["screenshot"]:
            if args.thumbnails:
                jpg = os.path.splitext(item["path"])[0] + ".jpg"
                thumbnail(item["screenshot"], jpg, report["graph_box"])
                print(f"  {os.path.relpath(jpg, REPO)} ({os.path.getsize(jpg) // 1000} KB)")
            shrink_png(item["screenshot"], args.max_png_bytes)
            print(f"  {os.path.relpath(item['screenshot'], REPO)} ({os.path.getsize(item['screenshot']) // 1000} KB)")
        with open(os.path.join(tempfile.gettempdir(), f"esd_layout_{item['name']}{args.suffix}.json"), "w") as handle:
            json.dump(report, handle, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
