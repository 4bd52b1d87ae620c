// catchtag token viewer: no network, no libraries. Data: <script id="catchtag-data" type="application/json">.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("catchtag-data").textContent);
  const T = D.tokens.length, L = D.n_layers, H = D.n_heads;
  // a written text (catchtag generate) has steps: at step k the page shows the text up to the k-th written token
  // (step 0: the prompt) and each head's sinks then; a head's attention bytes then cover every position that was
  // ever one of its sinks (info.u), and info.ev lists its sinks whenever they change: [step, positions, n_sinks]
  const G = D.steps || null;
  let step = G ? G.last : null;
  const PALETTE = [[214, 39, 40], [31, 119, 180], [44, 160, 44], [255, 127, 14], [148, 103, 189], [140, 86, 75], [227, 119, 194], [23, 190, 207], [188, 189, 34]];
  const cache = new Map();
  function attn(l, h) { // Uint8Array T*K (row-major), value/255 = attention of token i to sink k
    const key = l * H + h;
    if (!cache.has(key)) {
      const s = atob(D.heads[l][h].a), a = new Uint8Array(s.length);
      for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
      cache.set(key, a);
    }
    return cache.get(key);
  }
  const show = (t) => t.replace(/\n/g, "⏎\n").replace(/\t/g, "⇥");
  const box = document.getElementById("tokens");
  const spans = new Array(T);
  const frag = document.createDocumentFragment();
  for (let i = 0; i < T; i++) {
    const s = document.createElement("span");
    s.className = "t"; s.dataset.i = i; s.textContent = show(D.tokens[i]) || "∅";
    spans[i] = s; frag.appendChild(s);
  }
  box.appendChild(frag);
  const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
  const opt = (sel, v, text) => { const o = document.createElement("option"); o.value = v; o.textContent = text; sel.appendChild(o); };
  opt(layerSel, "all", "all layers");
  for (let l = 0; l < L; l++) opt(layerSel, l, "layer " + l);
  opt(headSel, "all", "all heads");
  for (let h = 0; h < H; h++) opt(headSel, h, "head " + h);
  // current view: sinks (positions), per sink a Float32Array(T) of attention, counts of heads
  let view = null;
  // both forms of the variance explained, each named (runs saved before the uncentred form have none: null)
  function veText(ve, vu) {
    return `VE centred ${ve.toFixed(3)}` + (vu === null || vu === undefined || isNaN(vu) ? "" : `, uncentred ${vu.toFixed(3)}`);
  }
  function sinksAt(info) {  // [positions, n_sinks] of the head at the current step
    if (!G) return [info.s, info.s.length];
    let cur = [[], 0];
    for (const e of info.ev) { if (e[0] > step) break; cur = [e[1], e[2]]; }
    return cur;
  }
  function compute(layer, head) {
    const ls = layer === "all" ? [...Array(L).keys()] : [+layer];
    const hs = head === "all" ? [...Array(H).keys()] : [+head];
    const acc = new Map(), nheads = new Map();
    let n = 0, veSum = 0, vuSum = 0, unlisted = 0;
    for (const l of ls) for (const h of hs) {
      const info = D.heads[l][h], cols = info.u || info.s, K = cols.length, a = attn(l, h);
      const [now, count] = sinksAt(info);
      unlisted += count - now.length;
      n++; veSum += info.ve; vuSum += info.vu === null ? NaN : info.vu;
      for (const p of now) {
        const k = cols.indexOf(p);
        if (!acc.has(p)) { acc.set(p, new Float32Array(T)); nheads.set(p, 0); }
        nheads.set(p, nheads.get(p) + 1);
        const w = acc.get(p);
        for (let i = 0; i < T; i++) w[i] += a[i * K + k] / 255;
      }
    }
    for (const w of acc.values()) for (let i = 0; i < T; i++) w[i] /= n;
    const sinks = [...acc.keys()].sort((x, y) => nheads.get(y) - nheads.get(x) || x - y);
    return { sinks, acc, nheads, n, unlisted, ve: veSum / n, vu: vuSum / n, single: n === 1 ? D.heads[ls[0]][hs[0]] : null, ls, hs };
  }
  function render() {
    view = compute(layerSel.value, headSel.value);
    const colorOf = new Map();
    view.sinks.forEach((p, j) => colorOf.set(p, j < PALETTE.length ? PALETTE[j] : [120, 120, 120]));
    const isSink = new Set(view.sinks);
    const shownT = G ? G.prompt + step : T;
    for (let i = 0; i < T; i++) {
      spans[i].style.display = i < shownT ? "" : "none";
      let best = -1, bw = 0;
      for (const p of view.sinks) { const w = view.acc.get(p)[i]; if (w > bw) { bw = w; best = p; } }
      const s = spans[i];
      if (best >= 0 && bw > 0.004) {
        const c = colorOf.get(best), alpha = Math.min(1, 0.12 + 0.88 * bw);
        s.style.backgroundColor = `rgba(${c[0]},${c[1]},${c[2]},${alpha.toFixed(3)})`;
      } else s.style.backgroundColor = "";
      s.classList.toggle("sink", isSink.has(i));
    }
    const legend = document.getElementById("legend");
    legend.textContent = "";
    view.sinks.slice(0, 24).forEach((p) => {
      const c = colorOf.get(p), k = document.createElement("span");
      k.className = "key"; k.style.background = `rgba(${c[0]},${c[1]},${c[2]},0.6)`;
      k.textContent = `${p}: ${JSON.stringify(D.tokens[p])}` + (view.n > 1 ? ` ×${view.nheads.get(p)}` : "");
      legend.appendChild(k);
    });
    if (view.sinks.length > 24) legend.appendChild(document.createTextNode(` … ${view.sinks.length - 24} more`));
    const stepText = G ? `step ${step} of ${G.last} (` + (step === 0 ? "the prompt" : `written token ${JSON.stringify(D.tokens[G.prompt + step - 1])}`) + `, ${shownT} tokens): ` : "";
    const unlistedText = view.unlisted > 0 ? ` (${view.unlisted} more not listed: raise --keep)` : "";
    const scoresText = view.single && !G ? `, column scores ${view.single.sc.map((x) => x.toFixed(2)).join(", ") || "-"}` : "";
    const veWhen = G ? " after the last step" : "";
    const what = view.n === 1 ? `layer ${view.ls[0]}, head ${view.hs[0]}` : `${view.n} heads (mean attention over them)`;
    document.getElementById("info").textContent = `${stepText}${what}: ${view.sinks.length} sink(s)${unlistedText}, ` +
      (view.single ? `${veText(view.single.ve, view.single.vu)}${veWhen}${scoresText}` : `mean ${veText(view.ve, view.vu)}${veWhen}`) +
      `. Token colour: the sink it attends to most, stronger = more attention.`;
    document.querySelectorAll("#grid td").forEach((td) => {
      const l = +td.dataset.l, h = +td.dataset.h;
      td.classList.toggle("sel", view.ls.includes(l) && view.hs.includes(h));
    });
    document.body.dataset.sinks = view.sinks.slice().sort((a, b) => a - b).join(",");
  }
  // layer x head grid coloured by VE: click to pick a head
  const veColor = (v) => `rgb(${Math.round(255 - 200 * v)},${Math.round(255 - 120 * v)},${Math.round(255 - 40 * v)})`;
  const grid = document.getElementById("grid");
  const hr = grid.insertRow(); hr.appendChild(document.createElement("th"));
  for (let h = 0; h < H; h++) { const th = document.createElement("th"); th.textContent = h; hr.appendChild(th); }
  for (let l = 0; l < L; l++) {
    const r = grid.insertRow(), th = document.createElement("th"); th.textContent = l; r.appendChild(th);
    for (let h = 0; h < H; h++) {
      const td = r.insertCell(), info = D.heads[l][h], v = info.ve;
      td.dataset.l = l; td.dataset.h = h;
      td.style.background = veColor(v);
      td.title = `L${l}.H${h}: ${info.s.length} sink(s) ${info.s.join(",")}, ${veText(v, info.vu)}`;
    }
  }
  // the grid's colour scale: VE 0 to 1 in the same colours as the cells
  const scale = document.getElementById("scale");
  scale.style.background = `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map(veColor).join(", ")})`;
  grid.addEventListener("click", (e) => {
    const td = e.target.closest("td"); if (!td) return;
    layerSel.value = td.dataset.l; headSel.value = td.dataset.h; render();
  });
  if (G) {  // the step slider, and a button that plays the steps from the start
    const slider = document.getElementById("step"), play = document.getElementById("play");
    let timer = null;
    const stop = () => { clearInterval(timer); timer = null; play.textContent = "\u25B6"; };
    slider.addEventListener("input", () => { step = +slider.value; render(); });
    play.addEventListener("click", () => {
      if (timer) { stop(); return; }
      if (step >= G.last) step = 0;
      play.textContent = "\u23F8";
      timer = setInterval(() => {
        slider.value = String(step); render();
        if (step >= G.last) stop(); else step++;
      }, 150);
    });
  }
  layerSel.addEventListener("change", render);
  headSel.addEventListener("change", render);
  // hover: attention this token pays to each sink of the current view
  const tip = document.getElementById("tip");
  let hovered = null;
  box.addEventListener("mouseover", (e) => {
    const s = e.target.closest("span.t"); if (!s || !view) return;
    if (hovered) hovered.classList.remove("hover");
    hovered = s; s.classList.add("hover");
    const i = +s.dataset.i;
    const rows = view.sinks.filter((p) => p <= i).map((p) => [p, view.acc.get(p)[i]]).sort((a, b) => b[1] - a[1]).slice(0, 12);
    let text = `token ${i}: ${JSON.stringify(D.tokens[i])}` + (view.sinks.includes(i) ? "  (a sink)" : "") + "\n";
    text += rows.length ? rows.map(([p, w]) => `→ sink ${p} ${JSON.stringify(D.tokens[p])}: ${w.toFixed(3)}`).join("\n") : "no sink before this token";
    if (view.n > 1) text += `\n(mean over ${view.n} heads)`;
    tip.textContent = text; tip.style.display = "block";
  });
  box.addEventListener("mousemove", (e) => { tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px"; });
  box.addEventListener("mouseleave", () => { tip.style.display = "none"; if (hovered) hovered.classList.remove("hover"); });
  // start on the requested head
  layerSel.value = String(D.start[0]); headSel.value = String(D.start[1]);
  render();
  window.catchtagView = { render, compute, data: D, setStep: (k) => { step = k; if (G) document.getElementById("step").value = String(k); render(); } };
})();
