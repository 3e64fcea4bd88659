// The learning curve on a job's page: uPlot over /ui/jobs/{id}/curve, redrawn when htmx brings a
// new round. The curve element's data-points says how many rounds carry the drawn metric (what a
// person sees as points, and what the browser test counts); the table under it holds the same data.
(function () {
  "use strict";
  var COLOURS = { central: "#0b5cad", federated: "#b35900" };
  var LINE_COLOURS = ["#146c2e", "#6b2fa3", "#a4121c", "#4a525c", "#7a4d00"];
  var state = { data: null, metric: null, plot: null, loadedFor: null, asked: 0 };

  function fmt(v) { return v === null || v === undefined ? "–" : Number(v).toPrecision(4); }

  function fillTable(el, rounds, central, federated) {
    var body = document.querySelector("#curve-table tbody");
    if (!body) return;
    body.textContent = "";
    rounds.forEach(function (n, i) {
      var tr = document.createElement("tr");
      [String(n), fmt(central[i]), fmt(federated[i])].forEach(function (text, j) {
        var cell = document.createElement(j === 0 ? "th" : "td");
        if (j === 0) cell.scope = "row";
        cell.textContent = text;
        tr.appendChild(cell);
      });
      body.appendChild(tr);
    });
  }

  function draw(el) {
    var d = state.data, metric = state.metric;
    if (!d || !metric || !d.series[metric]) {
      el.dataset.points = "0";
      el.setAttribute("aria-label", "Learning curve: no completed round yet");
      el.textContent = "No completed round yet.";
      return;
    }
    var s = d.series[metric];
    var xs = d.rounds;
    var data = [xs, s.central, s.federated];
    var series = [
      { label: "round" },
      { label: "central " + metric, stroke: COLOURS.central, width: 2, points: { show: true, size: 6 } },
      { label: "federated " + metric, stroke: COLOURS.federated, width: 2, dash: [6, 4], points: { show: true, size: 6 } },
    ];
    Object.keys(d.lines).forEach(function (name, i) {
      var v = d.lines[name][metric];
      if (v === null || v === undefined) return;
      data.push(xs.map(function () { return v; }));
      series.push({ label: name, stroke: LINE_COLOURS[i % LINE_COLOURS.length], width: 1.5, dash: [2, 3], points: { show: false } });
    });
    var points = s.central.filter(function (v) { return v !== null; }).length;
    el.dataset.points = String(points);
    el.dataset.metric = metric;
    var last = s.central.length ? s.central[s.central.length - 1] : null;
    el.setAttribute("aria-label", "Learning curve of " + metric + " over " + xs.length + " rounds; latest central value " + fmt(last));
    fillTable(el, xs, s.central, s.federated);
    if (state.plot) { state.plot.destroy(); state.plot = null; }
    el.textContent = "";
    if (!window.uPlot || !xs.length) return;
    var width = Math.max(320, el.clientWidth || 800);
    state.plot = new window.uPlot({
      width: width, height: 300, series: series,
      scales: { x: { time: false } },
      // Rounds are whole numbers: ticks at 1, 2, 5, 10, ... rounds apart, never at 1.2.
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] }, { label: metric }],
      legend: { live: false },
    }, data, el);
  }

  function fillMetrics(select) {
    var names = Object.keys(state.data.series);
    select.textContent = "";
    names.forEach(function (n) {
      var o = document.createElement("option");
      o.value = n; o.textContent = n; o.selected = n === state.metric;
      select.appendChild(o);
    });
    select.disabled = names.length < 2;
  }

  function load(el) {
    // Two refreshes can overlap: only the answer to the latest request is drawn.
    var ask = ++state.asked;
    fetch(el.dataset.src, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) {
        if (!d || ask !== state.asked) return;
        state.data = d;
        if (!state.metric || !d.series[state.metric]) state.metric = d.metric;
        var select = document.getElementById("curve-metric");
        if (select) fillMetrics(select);
        draw(el);
      });
  }

  function refresh() {
    var el = document.getElementById("curve");
    var live = document.getElementById("live");
    if (!el) return;
    var mark = live ? live.dataset.completed : "";
    if (mark === state.loadedFor) return;
    state.loadedFor = mark;
    load(el);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var select = document.getElementById("curve-metric");
    if (select) select.addEventListener("change", function () {
      state.metric = select.value;
      draw(document.getElementById("curve"));
    });
    refresh();
    document.body.addEventListener("htmx:afterSettle", refresh);
    window.addEventListener("resize", function () {
      var el = document.getElementById("curve");
      if (el && state.data) draw(el);
    });
  });
})();
