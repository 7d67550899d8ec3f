(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("blmm-report-data").textContent);
  var CONFIG = {displaylogo: false, responsive: true};
  var TYPES = {f4: Float32Array, f8: Float64Array, i4: Int32Array, u4: Uint32Array,
               i2: Int16Array, u2: Uint16Array, i1: Int8Array, u1: Uint8Array};
  var meshes = {}, rendered = {}, visible = {}, live = [];
  function decode(spec) {
    var text = atob(spec.bdata), bytes = new Uint8Array(text.length);
    for (var n = 0; n < text.length; n++) { bytes[n] = text.charCodeAt(n); }
    return new TYPES[spec.dtype](bytes.buffer);
  }
  function mesh(key) {
    if (!meshes[key]) {
      var stored = DATA.geometry[key], arrays = {};
      Object.keys(stored).forEach(function (axis) { arrays[axis] = decode(stored[axis]); });
      meshes[key] = arrays;
    }
    return meshes[key];
  }
  function purge(index) {
    if (!rendered[index]) { return; }
    Plotly.purge(document.getElementById(DATA.figures[index].id));
    delete rendered[index];
    live = live.filter(function (i) { return i !== index; });
  }
  function release() {
    while (live.length > DATA.max_live_webgl) {
      var hidden = live.filter(function (i) { return !visible[i]; });
      if (!hidden.length) { return; }
      purge(hidden[0]);
    }
  }
  function render(index) {
    if (rendered[index]) { return rendered[index]; }
    var spec = DATA.figures[index];
    // plotly keeps (and may change) what it is given: draw from a copy of the spec.
    var figure = JSON.parse(JSON.stringify(spec.figure));
    figure.data.forEach(function (trace, t) {
      var key = spec.meshes[t];
      if (key) {
        var g = mesh(key);
        ["x", "y", "z", "i", "j", "k"].forEach(function (axis) { trace[axis] = g[axis]; });
      }
    });
    if (spec.template !== null) { figure.layout.template = DATA.templates[spec.template]; }
    rendered[index] = Plotly.newPlot(document.getElementById(spec.id), figure.data,
                                     figure.layout, CONFIG);
    if (spec.webgl) { live.push(index); release(); }
    return rendered[index];
  }
  window.blmmReport = {count: DATA.figures.length, figures: DATA.figures, render: render,
                       purge: purge};
  if (!("IntersectionObserver" in window)) {
    DATA.figures.forEach(function (spec, i) { render(i); });
    return;
  }
  var observer = new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      var index = Number(entry.target.getAttribute("data-figure"));
      visible[index] = entry.isIntersecting;
      if (entry.isIntersecting) { render(index); }
    });
    release();
  }, {rootMargin: "300px 0px"});
  DATA.figures.forEach(function (spec, i) {
    var div = document.getElementById(spec.id);
    div.setAttribute("data-figure", String(i));
    observer.observe(div);
  });
})();
