// impasto playground: a plain client of the server's own WebSocket API (docs/websocket.md).
// It sends the frames an SDK sends: authentication first, then modelSearch, imageUpload,
// async imageInference and getResponse polls. What the server says is shown as it says it.
"use strict";

(() => {
  const STORE = {
    apiKey: "impasto.playground.apiKey",
    recent: "impasto.playground.recent",
    form: "impasto.playground.form",
  };
  const RECENT_MAX = 20;
  const POLL_MS = 400;
  const PING_MS = 30000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  // authentication.apiKey must be non-empty; an open server (no keys configured) takes any.
  const OPEN_SERVER_KEY = "playground";
  // Offered for free-size models that report their side limits (minSide / maxSide).
  const COMMON_SIZES = [
    [512, 512], [768, 768], [1024, 1024], [1536, 1536], [2048, 2048], [256, 256], [128, 128],
    [512, 768], [768, 512], [576, 1024], [1024, 576], [832, 1216], [1216, 832],
    [896, 1152], [1152, 896], [768, 1344], [1344, 768], [1080, 1920], [1920, 1080],
  ];

  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // crypto.randomUUID exists only in secure contexts; a LAN address over http is not one.
  function uuid4() {
    if (window.crypto && typeof crypto.randomUUID === "function" && window.isSecureContext) {
      return crypto.randomUUID();
    }
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  function readJSON(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value === null ? fallback : value;
    } catch {
      return fallback;
    }
  }

  function writeJSON(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch {
      // Storage full or disabled: the page still works, it just forgets.
    }
  }

  function localError(code, message) {
    return { code, message, local: true };
  }

  // ---------------------------------------------------------------------------------------
  // Errors: shown verbatim (message, code, parameter), as the server sent them.

  const errorBox = $("errors");
  const errorList = $("error-list");

  function showErrors(errors) {
    for (const error of errors) {
      const parts = [
        h("code", { class: "error-code", "data-testid": "error-code" }, error.code || "error"),
        h("span", { class: "error-message", "data-testid": "error-message" }, error.message || ""),
      ];
      if (error.parameter) {
        parts.push(h("span", { class: "error-parameter", "data-testid": "error-parameter" },
          "parameter: ", h("code", {}, error.parameter)));
      }
      if (error.taskType) parts.push(h("span", { class: "error-task" }, error.taskType));
      errorList.append(h("li", { class: "error-item" }, ...parts));
    }
    errorBox.hidden = errorList.childElementCount === 0;
  }

  function clearErrors() {
    errorList.replaceChildren();
    errorBox.hidden = true;
  }

  $("dismiss-errors").addEventListener("click", clearErrors);

  // ---------------------------------------------------------------------------------------
  // The connection: one WebSocket, authenticated, reconnected with backoff, resuming its
  // session. Every task is answered by one frame that names its taskUUID (an async
  // imageInference answers with its acknowledgement), so requests are matched on it.

  class Connection {
    constructor() {
      this.ws = null;
      this.state = "connecting";
      this.authenticated = false;
      this.sessionUUID = null;
      this.sessionKey = null;
      this.attempt = 0;
      this.retryTimer = null;
      this.pending = new Map();
      // Recently answered taskUUIDs: a task resent after a reconnect may have been answered
      // from the resumed session's buffer first; its conflictTaskUUID then says nothing new.
      this.answered = new Set();
      this.readyListeners = [];
      setInterval(() => {
        if (this.ws && this.ws.readyState === WebSocket.OPEN) {
          this.ws.send(JSON.stringify([{ taskType: "ping", ping: true }]));
        }
      }, PING_MS);
    }

    key() {
      return $("api-key").value.trim();
    }

    url() {
      // Relative to the page, so a reverse proxy's path prefix is kept.
      const url = new URL("v1", window.location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      url.search = "";
      url.hash = "";
      return url.href;
    }

    onReady(listener) {
      this.readyListeners.push(listener);
    }

    setState(state, text) {
      this.state = state;
      const badge = $("connection");
      badge.dataset.state = state;
      badge.textContent = text;
    }

    connect() {
      clearTimeout(this.retryTimer);
      if (this.ws) {
        const old = this.ws;
        this.ws = null;
        old.close();
      }
      this.authenticated = false;
      this.setState("connecting", "connecting…");
      let ws;
      try {
        ws = new WebSocket(this.url());
      } catch (exc) {
        this.dropped();
        return;
      }
      this.ws = ws;
      ws.addEventListener("open", () => {
        if (this.ws === ws) this.authenticate();
      });
      ws.addEventListener("message", (event) => {
        if (this.ws === ws) this.receive(event.data);
      });
      ws.addEventListener("close", () => {
        if (this.ws !== ws) return;
        this.ws = null;
        this.dropped();
      });
    }

    dropped() {
      this.authenticated = false;
      for (const [taskUUID, entry] of this.pending) {
        if (!entry.sent) continue;
        if (entry.resend) {
          // Sent again after the next authentication, with the same taskUUID; the server's
          // conflictTaskUUID then means it had the task already.
          entry.sent = false;
          entry.resent = true;
        } else {
          this.pending.delete(taskUUID);
          entry.reject([localError("connectionLost", "The connection closed before the server answered.")]);
        }
      }
      const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt += 1;
      this.setState("closed", `disconnected, retrying in ${Math.max(1, Math.round(delay / 1000))} s`);
      this.retryTimer = setTimeout(() => this.connect(), delay);
    }

    authenticate() {
      const key = this.key();
      const task = { taskType: "authentication", apiKey: key || OPEN_SERVER_KEY };
      // Resuming keeps what the session's tasks sent while the socket was away.
      if (this.sessionUUID && this.sessionKey === key) task.connectionSessionUUID = this.sessionUUID;
      this.authKey = key;
      this.authenticated = false;
      this.setState("connecting", "authenticating…");
      this.ws.send(JSON.stringify([task]));
    }

    // A new key: authenticate again on the open socket, or connect now.
    reauthenticate() {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) {
        this.authenticate();
      } else {
        this.attempt = 0;
        this.connect();
      }
    }

    receive(text) {
      let frame;
      try {
        frame = JSON.parse(text);
      } catch {
        return;
      }
      const byTask = new Map();
      for (const item of frame.data || []) {
        if (item.taskType === "authentication" && item.connectionSessionUUID) {
          this.authenticatedAs(item.connectionSessionUUID);
        } else if (item.taskUUID && this.pending.has(item.taskUUID)) {
          if (!byTask.has(item.taskUUID)) byTask.set(item.taskUUID, []);
          byTask.get(item.taskUUID).push(item);
        }
      }
      for (const [taskUUID, items] of byTask) this.settle(taskUUID, items, null);
      const errorsByTask = new Map();
      const orphans = [];
      for (const error of frame.errors || []) {
        if (error.taskType === "authentication" && !error.taskUUID) {
          this.authenticated = false;
          this.setState("auth-failed", "authentication failed");
          orphans.push(error);
        } else if (error.taskUUID && this.pending.has(error.taskUUID)) {
          if (!errorsByTask.has(error.taskUUID)) errorsByTask.set(error.taskUUID, []);
          errorsByTask.get(error.taskUUID).push(error);
        } else if (error.code === "conflictTaskUUID" && this.answered.has(error.taskUUID)) {
          continue;
        } else {
          orphans.push(error);
        }
      }
      for (const [taskUUID, errors] of errorsByTask) this.settle(taskUUID, null, errors);
      if (orphans.length) showErrors(orphans);
    }

    settle(taskUUID, items, errors) {
      const entry = this.pending.get(taskUUID);
      this.pending.delete(taskUUID);
      if (entry.resent) {
        this.answered.add(taskUUID);
        if (this.answered.size > 200) this.answered.delete(this.answered.values().next().value);
      }
      if (errors && entry.resent && errors.every((e) => e.code === "conflictTaskUUID")) {
        entry.resolve([]);
      } else if (errors) {
        entry.reject(errors);
      } else {
        entry.resolve(items);
      }
    }

    authenticatedAs(sessionUUID) {
      this.sessionUUID = sessionUUID;
      this.sessionKey = this.authKey;
      this.authenticated = true;
      this.attempt = 0;
      this.setState("open", "connected");
      const unsent = [...this.pending.values()].filter((entry) => !entry.sent);
      if (unsent.length) this.transmit(unsent);
      for (const listener of this.readyListeners) listener();
    }

    // Send tasks in one frame; one promise per task, resolved with the data items naming
    // it, rejected with its error items. `resend`: send again after a reconnect.
    request(tasks, { resend = false } = {}) {
      const entries = tasks.map((task) => {
        const entry = { task, resend, sent: false, resent: false };
        entry.promise = new Promise((resolve, reject) => {
          entry.resolve = resolve;
          entry.reject = reject;
        });
        this.pending.set(task.taskUUID, entry);
        return entry;
      });
      const open = this.ws && this.ws.readyState === WebSocket.OPEN;
      // Refused authentication: the server answers with its own missingApiKey.
      if (open && (this.authenticated || this.state === "auth-failed")) this.transmit(entries);
      return entries.map((entry) => entry.promise);
    }

    send(task, options) {
      return this.request([task], options)[0];
    }

    transmit(entries) {
      for (const entry of entries) entry.sent = true;
      this.ws.send(JSON.stringify(entries.map((entry) => entry.task)));
    }
  }

  const conn = new Connection();

  // ---------------------------------------------------------------------------------------
  // Models: modelSearch, image-generation checkpoints only.

  const models = new Map();
  let modelsLoaded = false;
  let modelsLoading = false;

  function isGenerator(model) {
    const category = model.category || "checkpoint";
    const type = model.type || "base";
    if (category !== "checkpoint" || type !== "base") return false;
    return !Array.isArray(model.modes) || model.modes.includes("text2img");
  }

  async function loadModels() {
    if (modelsLoaded || modelsLoading) return;
    modelsLoading = true;
    try {
      const found = [];
      for (let offset = 0; ; offset += 100) {
        const items = await conn.send({ taskType: "modelSearch", taskUUID: uuid4(), limit: 100, offset });
        const page = items[0] || {};
        const results = page.results || [];
        found.push(...results);
        if (!results.length || offset + results.length >= (page.totalResults || 0)) break;
      }
      models.clear();
      for (const model of found.filter(isGenerator)) models.set(model.air, model);
      modelsLoaded = true;
      fillModels();
    } catch (errors) {
      if (!errors.every((e) => e.code === "connectionLost")) showErrors(errors);
    } finally {
      modelsLoading = false;
    }
  }

  function fillModels() {
    const select = $("model");
    const saved = readJSON(STORE.form, {});
    select.replaceChildren();
    const byArchitecture = new Map();
    for (const model of models.values()) {
      const group = model.architecture || "other";
      if (!byArchitecture.has(group)) byArchitecture.set(group, []);
      byArchitecture.get(group).push(model);
    }
    for (const [architecture, list] of byArchitecture) {
      const group = h("optgroup", { label: architecture });
      for (const model of list) {
        group.append(h("option", { value: model.air, title: model.name }, `${model.air} — ${model.name}`));
      }
      select.append(group);
    }
    if (!models.size) select.append(h("option", { value: "" }, "No image models on this server"));
    if (saved.model && models.has(saved.model)) select.value = saved.model;
    select.disabled = models.size === 0;
    $("generate").disabled = models.size === 0;
    modelChanged();
    if (saved.size && [...$("size").options].some((o) => o.value === saved.size)) {
      $("size").value = saved.size;
      sizeChanged();
    }
  }

  function currentModel() {
    return models.get($("model").value) || null;
  }

  // Whether the model takes a generation parameter. With `parameters` in modelSearch that is
  // exact; without, a model with sampler defaults (defaultSteps) is taken to have them.
  function accepts(model, parameter) {
    if (!model) return false;
    if (Array.isArray(model.parameters)) return model.parameters.includes(parameter);
    return model.defaultSteps !== undefined;
  }

  function hasMode(model, mode) {
    return Boolean(model && Array.isArray(model.modes) && model.modes.includes(mode));
  }

  function pairOf(size) {
    if (Array.isArray(size)) return [Number(size[0]), Number(size[1])];
    return [Number(size.width), Number(size.height)];
  }

  function gcd(a, b) {
    return b ? gcd(b, a % b) : a;
  }

  function sizeLabel([w, h2], note) {
    const d = gcd(w, h2);
    const ratio = w / d <= 21 && h2 / d <= 21 ? ` (${w / d}:${h2 / d})` : "";
    return `${w} × ${h2}${ratio}${note ? ` · ${note}` : ""}`;
  }

  // The size choices a model reports: an exact list (allowedSizes), or common sizes within
  // its side limits (minSide / maxSide); otherwise its default and free width/height.
  function sizeChoices(model) {
    const defaultSize = [model.defaultWidth || 512, model.defaultHeight || 512];
    if (Array.isArray(model.allowedSizes) && model.allowedSizes.length) {
      return { sizes: model.allowedSizes.map(pairOf), defaultSize, custom: false };
    }
    if (Number.isFinite(model.minSide) && Number.isFinite(model.maxSide)) {
      const fits = ([w, h2]) => w >= model.minSide && h2 >= model.minSide && w <= model.maxSide && h2 <= model.maxSide;
      const sizes = [defaultSize, ...COMMON_SIZES.filter(fits)];
      const unique = sizes.filter((s, i) => sizes.findIndex((t) => t[0] === s[0] && t[1] === s[1]) === i);
      return { sizes: unique, defaultSize, custom: true, min: model.minSide, max: model.maxSide };
    }
    return { sizes: [defaultSize], defaultSize, custom: true };
  }

  function modelChanged() {
    const model = currentModel();
    const size = $("size");
    size.replaceChildren();
    if (!model) return;
    const choices = sizeChoices(model);
    for (const pair of choices.sizes) {
      const isDefault = pair[0] === choices.defaultSize[0] && pair[1] === choices.defaultSize[1];
      size.append(h("option", { value: `${pair[0]}x${pair[1]}` }, sizeLabel(pair, isDefault ? "default" : "")));
    }
    if (choices.custom) size.append(h("option", { value: "custom" }, "Custom…"));
    size.value = `${choices.defaultSize[0]}x${choices.defaultSize[1]}`;
    for (const id of ["width", "height"]) {
      const input = $(id);
      input.min = choices.min || 1;
      if (choices.max) input.max = choices.max;
      else input.removeAttribute("max");
    }
    $("width").value = choices.defaultSize[0];
    $("height").value = choices.defaultSize[1];
    sizeChanged();

    for (const node of document.querySelectorAll("[data-needs]")) {
      node.hidden = !accepts(model, node.dataset.needs);
    }
    $("steps").placeholder = model.defaultSteps !== undefined ? `default ${model.defaultSteps}` : "model default";
    $("reference-mode").hidden = !hasMode(model, "referenceImages");
    $("reference-hint").textContent = model.maxReferenceImages ? `up to ${model.maxReferenceImages}` : "";
    $("seed-image-mode").hidden = !hasMode(model, "img2img");

    const maxResults = Math.min(4, model.maxResults || 4);
    for (const option of $("number-results").options) option.disabled = Number(option.value) > maxResults;
    if (Number($("number-results").value) > maxResults) $("number-results").value = String(maxResults);

    const facts = [model.architecture];
    if (Array.isArray(model.modes)) facts.push(model.modes.join(", "));
    if (model.defaultSteps !== undefined) facts.push(`${model.defaultSteps} steps`);
    if (model.comment) facts.push(model.comment);
    $("model-info").textContent = facts.filter(Boolean).join(" · ");
  }

  function sizeChanged() {
    $("custom-size").hidden = $("size").value !== "custom";
  }

  function chosenSize() {
    const value = $("size").value;
    if (value === "custom" || !value) return [Number($("width").value), Number($("height").value)];
    return value.split("x").map(Number);
  }

  function saveForm() {
    writeJSON(STORE.form, {
      model: $("model").value,
      size: $("size").value,
      numberResults: $("number-results").value,
      outputFormat: $("output-format").value,
    });
  }

  $("model").addEventListener("change", () => {
    modelChanged();
    saveForm();
  });
  $("size").addEventListener("change", () => {
    sizeChanged();
    saveForm();
  });
  $("number-results").addEventListener("change", saveForm);
  $("output-format").addEventListener("change", saveForm);

  // ---------------------------------------------------------------------------------------
  // Uploads: each dropped or chosen file goes up with imageUpload; tasks name its imageUUID.

  class UploadList {
    constructor(listId, inputId, dropId, { single }) {
      this.list = $(listId);
      this.single = single;
      this.items = [];
      const input = $(inputId);
      input.addEventListener("change", () => {
        this.add([...input.files]);
        input.value = "";
      });
      const drop = $(dropId);
      drop.addEventListener("dragover", (event) => {
        event.preventDefault();
        drop.classList.add("dragging");
      });
      drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
      drop.addEventListener("drop", (event) => {
        event.preventDefault();
        drop.classList.remove("dragging");
        this.add([...(event.dataTransfer ? event.dataTransfer.files : [])]);
      });
    }

    add(fileList) {
      const chosen = this.single ? fileList.slice(0, 1) : fileList;
      if (this.single) for (const item of [...this.items]) this.remove(item);
      for (const file of chosen) this.upload(file);
    }

    upload(file) {
      const preview = URL.createObjectURL(file);
      const status = h("span", { class: "upload-status" }, "uploading…");
      const item = { file, preview, imageUUID: null, state: "uploading" };
      item.node = h("li", { class: "upload", "data-testid": "upload", "data-state": "uploading" },
        h("img", { src: preview, alt: file.name }),
        h("span", { class: "upload-name", title: file.name }, file.name),
        status,
        h("button", { type: "button", class: "remove", "aria-label": `Remove ${file.name}`, onclick: () => this.remove(item) }, "×"));
      this.list.append(item.node);
      this.items.push(item);
      item.promise = readDataURI(file)
        .then((dataURI) => conn.send({ taskType: "imageUpload", taskUUID: uuid4(), image: dataURI }, { resend: true }))
        .then((items) => {
          const result = items.find((i) => i.imageUUID) || {};
          if (!result.imageUUID) throw [localError("noImageUUID", "imageUpload answered without an imageUUID.")];
          item.imageUUID = result.imageUUID;
          item.state = "ready";
          item.node.dataset.state = "ready";
          item.node.dataset.imageUuid = result.imageUUID;
          status.textContent = "ready";
        })
        .catch((errors) => {
          item.state = "error";
          item.node.dataset.state = "error";
          const list = Array.isArray(errors) ? errors : [localError("uploadFailed", String(errors))];
          status.textContent = list.map((e) => e.code).join(", ");
          showErrors(list);
        });
    }

    remove(item) {
      this.items = this.items.filter((i) => i !== item);
      item.node.remove();
      URL.revokeObjectURL(item.preview);
    }

    // The imageUUIDs, once every upload has settled; null when one failed (already shown).
    async uuids() {
      await Promise.all(this.items.map((item) => item.promise));
      if (this.items.some((item) => item.state !== "ready")) return null;
      return this.items.map((item) => item.imageUUID);
    }
  }

  function readDataURI(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.addEventListener("load", () => resolve(reader.result));
      reader.addEventListener("error", () => reject([localError("unreadableFile", `Could not read ${file.name}.`)]));
      reader.readAsDataURL(file);
    });
  }

  const references = new UploadList("reference-list", "reference-input", "reference-drop", { single: false });
  const seedImages = new UploadList("seed-image-list", "seed-image-input", "seed-image-drop", { single: true });

  // ---------------------------------------------------------------------------------------
  // Recent tasks, kept in localStorage across reloads.

  function loadRecent() {
    const list = readJSON(STORE.recent, []);
    return Array.isArray(list) ? list.filter((r) => r && typeof r.taskUUID === "string").slice(0, RECENT_MAX) : [];
  }

  function remember(record) {
    const list = [record, ...loadRecent().filter((r) => r.taskUUID !== record.taskUUID)].slice(0, RECENT_MAX);
    writeJSON(STORE.recent, list);
    renderRecent();
  }

  function renderRecent() {
    const list = loadRecent();
    const ol = $("recent");
    ol.replaceChildren();
    for (const record of list) {
      const view = views.get(record.taskUUID);
      const status = view ? view.status : "";
      ol.append(h("li", { class: "recent-item", "data-testid": "recent-item", "data-task-uuid": record.taskUUID },
        h("button", {
          type: "button",
          class: "recent-open",
          onclick: () => openRecent(record),
        },
        h("span", { class: "recent-prompt" }, record.prompt || "(empty prompt)"),
        h("span", { class: "recent-meta" },
          `${record.model} · ${new Date(record.time).toLocaleString()}`,
          status ? h("span", { class: `badge badge-${status}`, "data-testid": "recent-status" }, status) : null))));
    }
    $("recent-empty").hidden = list.length > 0;
  }

  function openRecent(record) {
    let view = views.get(record.taskUUID);
    if (!view) {
      view = new TaskView(record, { live: false });
      gallery.prepend(view.node);
    }
    if (view.status === "expired" || view.status === "error") view.restart();
    view.node.scrollIntoView({ behavior: "smooth", block: "start" });
    view.node.focus({ preventScroll: true });
  }

  $("clear-recent").addEventListener("click", () => {
    writeJSON(STORE.recent, []);
    renderRecent();
  });

  // ---------------------------------------------------------------------------------------
  // The gallery: one group per task, one tile per requested image; pending tiles show the
  // progress that getResponse reports, finished ones the image, its seed, cost and size.

  const gallery = $("gallery");
  const views = new Map();
  const polled = new Set();

  class TaskView {
    constructor(record, { live }) {
      this.record = record;
      this.live = live;
      this.status = "running";
      this.inflight = false;
      this.tiles = [];
      this.tileBox = h("div", { class: "tiles" });
      this.statusNode = h("span", { class: "badge badge-running", "data-testid": "task-status" }, "running");
      const size = record.width && record.height ? `${record.width} × ${record.height}` : "";
      this.node = h("article", { class: "task", "data-testid": "task", "data-task-uuid": record.taskUUID, tabindex: "-1" },
        h("header", { class: "task-head" },
          h("p", { class: "task-prompt" }, record.prompt || "(empty prompt)"),
          h("p", { class: "task-meta" },
            [record.model, size, record.outputFormat, new Date(record.time).toLocaleTimeString()].filter(Boolean).join(" · "),
            " ", this.statusNode)),
        this.tileBox);
      this.resize(record.numberResults || 1);
      views.set(record.taskUUID, this);
      $("gallery-empty").hidden = true;
    }

    setStatus(status) {
      this.status = status;
      this.statusNode.className = `badge badge-${status}`;
      this.statusNode.textContent = status;
      this.node.dataset.status = status;
      renderRecent();
    }

    resize(count) {
      while (this.tiles.length < count) {
        const tile = new Tile(this, this.tiles.length);
        this.tiles.push(tile);
        this.tileBox.append(tile.node);
      }
      while (this.tiles.length > count) this.tiles.pop().node.remove();
    }

    poll() {
      this.setStatus("running");
      polled.add(this);
    }

    restart() {
      for (const tile of this.tiles) tile.pending(0);
      this.poll();
    }

    // getResponse: one item per requested image.
    update(items) {
      const generations = items.filter((item) => item.status);
      if (!generations.length) return;
      this.resize(generations.length);
      const failures = [];
      generations.forEach((item, i) => {
        if (item.status === "success") this.tiles[i].done(item);
        else if (item.status === "error") {
          if (this.tiles[i].error(item.error || {}) && this.live) failures.push({ ...item.error, taskType: item.taskType, taskUUID: item.taskUUID });
        } else this.tiles[i].pending(item.progress || 0);
      });
      if (failures.length) showErrors(failures);
      if (generations.every((item) => item.status === "success" || item.status === "error")) {
        polled.delete(this);
        this.setStatus(generations.some((item) => item.status === "error") ? "error" : "done");
      }
    }

    fail(errors) {
      if (errors.every((e) => e.code === "connectionLost")) return; // the next poll tries again
      polled.delete(this);
      if (errors.some((e) => e.code === "taskNotFound")) {
        for (const tile of this.tiles) tile.expired("The task's results are no longer kept.");
        this.setStatus("expired");
      } else {
        this.setStatus("error");
      }
      if (this.live || !errors.some((e) => e.code === "taskNotFound")) showErrors(errors);
    }
  }

  class Tile {
    constructor(view, index) {
      this.view = view;
      this.index = index;
      this.state = null;
      this.node = h("div", { class: "tile" });
      this.pending(0);
    }

    pending(progress) {
      const value = Math.max(0, Math.min(100, Number(progress) || 0));
      if (this.state !== "pending") {
        this.state = "pending";
        this.bar = h("progress", {
          "data-testid": "progress",
          max: "100",
          value: String(value),
          "aria-label": `Image ${this.index + 1} progress`,
        });
        this.label = h("span", { class: "progress-label" });
        this.node.className = "tile tile-pending";
        // A placeholder of the image's shape (CSSOM, which the page's CSP allows).
        const { width, height } = this.view.record;
        this.node.style.aspectRatio = width && height ? `${width} / ${height}` : "";
        this.node.dataset.testid = "pending-tile";
        this.node.replaceChildren(h("div", { class: "pending-inner" }, h("span", { class: "spinner", "aria-hidden": "true" }), this.bar, this.label));
      }
      this.bar.value = value;
      this.label.textContent = value > 0 ? `${Math.round(value)} %` : "queued";
      this.node.dataset.progress = String(value);
    }

    done(item) {
      if (this.state === "done" && this.imageUUID === item.imageUUID) return;
      this.state = "done";
      this.imageUUID = item.imageUUID;
      const url = item.imageURL || item.imageDataURI || "";
      const extension = (url.match(/\.(\w+)(?:$|\?)/) || [])[1] || (this.view.record.outputFormat || "img").toLowerCase();
      const size = h("dd", { "data-testid": "pixel-size" }, "…");
      const img = h("img", {
        src: url,
        alt: this.view.record.prompt || "generated image",
        decoding: "async",
      });
      this.node.className = "tile tile-done";
      this.node.style.aspectRatio = "";
      this.node.dataset.testid = "gallery-item";
      this.node.dataset.imageUuid = item.imageUUID || "";
      this.node.dataset.taskUuid = item.taskUUID || this.view.record.taskUUID;
      if (item.seed !== undefined) this.node.dataset.seed = String(item.seed);
      img.addEventListener("load", () => {
        size.textContent = `${img.naturalWidth} × ${img.naturalHeight}`;
        this.node.dataset.width = String(img.naturalWidth);
        this.node.dataset.height = String(img.naturalHeight);
        this.node.dataset.loaded = "true";
      });
      // A server with IMPASTO_PRIVATE_IMAGES wants the key on /image/: fetch the image with
      // it once and show it from a blob URL. Anything else that fails has expired.
      let retried = false;
      img.addEventListener("error", async () => {
        const key = conn.key();
        let sameOrigin = false;
        try { sameOrigin = new URL(url, location.href).origin === location.origin; } catch (_) { /* not a URL */ }
        if (!retried && key && sameOrigin && !url.startsWith("blob:")) {
          retried = true;
          try {
            const response = await fetch(url, { headers: { Authorization: `Bearer ${key}` } });
            if (response.ok) {
              const local = URL.createObjectURL(await response.blob());
              img.src = local;
              for (const link of this.node.querySelectorAll("a")) link.href = local;
              return;
            }
          } catch (_) { /* fall through */ }
        }
        this.expired("The image is no longer stored (its URL expired).");
      });
      const facts = h("dl", { class: "facts" },
        h("dt", {}, "seed"), h("dd", { "data-testid": "seed-value" }, item.seed !== undefined ? String(item.seed) : "–"),
        h("dt", {}, "cost"), h("dd", { "data-testid": "cost" }, item.cost !== undefined ? `$${item.cost}` : "–"),
        h("dt", {}, "size"), size);
      this.node.replaceChildren(
        h("a", { class: "image-link", href: url, target: "_blank", rel: "noopener" }, img),
        h("div", { class: "caption" }, facts,
          h("a", { class: "download", href: url, download: `impasto-${item.imageUUID || "image"}.${extension}`, "data-testid": "download" }, "Download")));
    }

    error(error) {
      if (this.state === "error") return false;
      this.state = "error";
      this.node.className = "tile tile-error";
      this.node.style.aspectRatio = "";
      this.node.dataset.testid = "tile-error";
      this.node.replaceChildren(h("div", { class: "tile-message" },
        h("code", {}, error.code || "error"), h("p", {}, error.message || ""),
        error.parameter ? h("p", { class: "hint" }, `parameter: ${error.parameter}`) : null));
      return true;
    }

    expired(message) {
      this.state = "expired";
      this.node.className = "tile tile-expired";
      this.node.style.aspectRatio = "";
      this.node.dataset.testid = "expired";
      this.node.replaceChildren(h("div", { class: "tile-message" }, h("strong", {}, "expired"), h("p", {}, message)));
    }
  }

  function pollLoop() {
    if (conn.authenticated) {
      const due = [...polled].filter((view) => !view.inflight);
      if (due.length) {
        const replies = conn.request(due.map((view) => ({ taskType: "getResponse", taskUUID: view.record.taskUUID })));
        due.forEach((view, i) => {
          view.inflight = true;
          replies[i]
            .then((items) => view.update(items), (errors) => view.fail(errors))
            .finally(() => {
              view.inflight = false;
            });
        });
      }
    }
    setTimeout(pollLoop, POLL_MS);
  }

  // ---------------------------------------------------------------------------------------
  // Generate: async imageInference with URL output, then getResponse polls.

  function optionalNumber(id) {
    const node = $(id);
    const field = node.closest("[data-needs]");
    if ((field && field.hidden) || node.value.trim() === "") return undefined;
    return Number(node.value);
  }

  async function generate() {
    clearErrors();
    const model = currentModel();
    const [width, height] = chosenSize();
    const task = {
      taskType: "imageInference",
      taskUUID: uuid4(),
      model: $("model").value,
      positivePrompt: $("prompt").value,
      width,
      height,
      numberResults: Number($("number-results").value),
      outputType: "URL",
      outputFormat: $("output-format").value,
      deliveryMethod: "async",
      includeCost: true,
    };
    const negative = $("negative-prompt").value;
    if (accepts(model, "negativePrompt") && negative.trim()) task.negativePrompt = negative;
    const seed = optionalNumber("seed");
    if (seed !== undefined) task.seed = seed;
    const steps = optionalNumber("steps");
    if (steps !== undefined) task.steps = steps;
    const button = $("generate");
    button.disabled = true;
    try {
      if (!$("reference-mode").hidden && references.items.length) {
        const uuids = await references.uuids();
        if (uuids === null) return;
        task.referenceImages = uuids;
      }
      if (!$("seed-image-mode").hidden && seedImages.items.length) {
        const uuids = await seedImages.uuids();
        if (uuids === null) return;
        task.seedImage = uuids[0];
        const strength = optionalNumber("strength");
        if (strength !== undefined) task.strength = strength;
      }
      const record = {
        taskUUID: task.taskUUID,
        prompt: task.positivePrompt,
        model: task.model,
        width,
        height,
        numberResults: task.numberResults,
        outputFormat: task.outputFormat,
        time: Date.now(),
      };
      const view = new TaskView(record, { live: true });
      gallery.prepend(view.node);
      try {
        await conn.send(task, { resend: true });
      } catch (errors) {
        view.node.remove();
        views.delete(task.taskUUID);
        $("gallery-empty").hidden = views.size > 0;
        showErrors(errors);
        return;
      }
      remember(record);
      view.poll();
    } finally {
      button.disabled = models.size === 0;
    }
  }

  $("generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("generate-form").requestSubmit();
    }
  });

  // ---------------------------------------------------------------------------------------
  // Start: the key, the form, the recent tasks (fetched again), then the socket.

  $("api-key").value = readJSON(STORE.apiKey, "");
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    writeJSON(STORE.apiKey, conn.key());
    clearErrors();
    conn.reauthenticate();
  });

  const savedForm = readJSON(STORE.form, {});
  if (["1", "2", "3", "4"].includes(savedForm.numberResults)) $("number-results").value = savedForm.numberResults;
  if (["JPG", "PNG", "WEBP"].includes(savedForm.outputFormat)) $("output-format").value = savedForm.outputFormat;

  for (const record of loadRecent().reverse()) {
    const view = new TaskView(record, { live: false });
    gallery.prepend(view.node);
    view.poll();
  }
  renderRecent();

  conn.onReady(() => loadModels());
  conn.connect();
  pollLoop();
})();
