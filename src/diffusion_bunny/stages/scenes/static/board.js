// Review board of stage 04 (scenes): the front end of diffusion_bunny.board.ReviewBoard.
//
// The kernel owns the truth: every move goes to Python as one message ({type: "move", ...}),
// Python writes it to disk (feedback row + clusters) and sends back the folders as they are on
// disk now. This file only draws the folders and turns a drag, a click or a key into a message,
// so a kernel restart loses nothing and the board never shows a move that was not saved.
//
// Test hooks: every folder carries data-cluster-id, every thumbnail data-frame-id, the status
// line data-role="status", the root data-view and data-pending (a move is on its way).

const FRAME_TYPE = "application/x-diffusion-bunny-frame";
// A typed number waits this long for a second digit when one could still follow (folder 1 vs 12).
const DIGIT_WAIT_MS = 700;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function frameTitle(frame) {
  const parts = [frame.frame_id];
  parts.push(frame.similarity === null || frame.similarity === undefined
    ? "similarity: none (noise)"
    : `similarity ${Number(frame.similarity).toFixed(3)}`);
  if (frame.shot_id !== null && frame.shot_id !== undefined) parts.push(`shot ${frame.shot_id}`);
  if (frame.timestamp_s !== null && frame.timestamp_s !== undefined) {
    parts.push(`${Number(frame.timestamp_s).toFixed(1)} s`);
  }
  if (frame.manual) parts.push("placed by hand");
  return parts.join(" · ");
}

function render({ model, el: host }) {
  let selected = null; // {frameId, clusterId} of the clicked thumbnail
  let digits = "";
  let digitTimer = null;

  const root = el("div", "db-board");
  root.tabIndex = 0; // keys reach the board once it has focus (a click on a thumbnail gives it)
  // JupyterLab 4 leaves keys alone inside an element with this attribute, so "1" does not turn
  // the cell into a heading and Escape does not leave the board while a frame is selected.
  root.setAttribute("data-lm-suppress-shortcuts", "true");

  const header = el("div", "db-header");
  const title = el("span", "db-title", "review board");
  const toggle = el("div", "db-toggle");
  const viewButtons = {};
  for (const view of ["scene", "character"]) {
    const button = el("button", "db-view", view === "scene" ? "scenes" : "characters");
    button.type = "button";
    button.dataset.view = view;
    button.addEventListener("click", () => {
      if (model.get("view") === view) return;
      clearSelection();
      model.set("view", view);
      model.save_changes();
    });
    viewButtons[view] = button;
    toggle.appendChild(button);
  }
  const refresh = el("button", "db-refresh", "reload");
  refresh.type = "button";
  refresh.title = "read the folders from disk again (after a move in another notebook)";
  refresh.addEventListener("click", () => model.send({ type: "refresh" }));
  header.append(title, toggle, refresh);

  const hint = el(
    "div",
    "db-hint",
    "Drag a picture onto a folder, or click it and press the folder's number " +
      "(n: noise, +: new folder, Esc: clear) or its \u201cmove here\u201d button.",
  );
  const status = el("div", "db-status");
  status.dataset.role = "status";
  const grid = el("div", "db-folders");
  root.append(header, hint, status, grid);
  host.appendChild(root);

  function clearSelection() {
    if (selected) drawStatus();
    selected = null;
    digits = "";
    if (digitTimer) clearTimeout(digitTimer);
    digitTimer = null;
    root.classList.remove("db-has-selection");
    for (const node of root.querySelectorAll(".db-thumb.db-selected")) node.classList.remove("db-selected");
  }

  function select(frameId, clusterId, node) {
    if (selected && selected.frameId === frameId) {
      clearSelection();
      return;
    }
    clearSelection();
    selected = { frameId, clusterId };
    node.classList.add("db-selected");
    root.classList.add("db-has-selection");
    root.focus({ preventScroll: true });
    const keys = model.get("view") === "scene" ? "a folder's number, n (noise) or + (new)" : "a folder's number or n (noise)";
    setStatus(`selected ${frameId} (in ${clusterId}): press ${keys}, or a folder's \u201cmove here\u201d; Esc clears`, "info");
  }

  function setStatus(text, kind) {
    status.textContent = text;
    status.dataset.kind = kind;
  }

  function folderOf(frameId) {
    for (const folder of model.get("folders")) {
      if (folder.frames.some((f) => f.frame_id === frameId)) return folder.id;
    }
    return null;
  }

  function move(frameId, fromId, toId) {
    if (!frameId || !toId) return;
    clearSelection();
    if (fromId === toId) {
      setStatus(`${frameId} is already in ${toId}`, "info");
      return;
    }
    const node = root.querySelector(`.db-thumb[data-frame-id="${CSS.escape(frameId)}"]`);
    if (node) node.classList.add("db-moving");
    root.dataset.pending = "1";
    setStatus(`moving ${frameId} to ${toId}\u2026`, "info");
    model.send({ type: "move", frame_id: frameId, cluster_id: toId, level: model.get("view") });
  }

  function makeTarget(node, clusterId) {
    let depth = 0; // dragenter/dragleave fire for every child: count to know when the drag left
    node.addEventListener("dragenter", (event) => {
      if (!event.dataTransfer.types.includes(FRAME_TYPE)) return;
      event.preventDefault();
      depth += 1;
      node.classList.add("db-drop");
    });
    node.addEventListener("dragover", (event) => {
      if (!event.dataTransfer.types.includes(FRAME_TYPE)) return;
      event.preventDefault(); // allows the drop
      event.dataTransfer.dropEffect = "move";
    });
    node.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) node.classList.remove("db-drop");
    });
    node.addEventListener("drop", (event) => {
      depth = 0;
      node.classList.remove("db-drop");
      const payload = event.dataTransfer.getData(FRAME_TYPE);
      if (!payload) return;
      event.preventDefault();
      event.stopPropagation(); // JupyterLab would otherwise treat it as a file dropped on the notebook
      const { frameId, clusterId: fromId } = JSON.parse(payload);
      move(frameId, fromId, clusterId);
    });
  }

  function makeThumb(frame, folderId, thumbs) {
    const cell = el("div", "db-thumb");
    cell.dataset.frameId = frame.frame_id;
    cell.dataset.clusterId = folderId;
    cell.draggable = true;
    cell.title = frameTitle(frame);
    if (frame.manual) cell.classList.add("db-manual");
    const src = thumbs[frame.frame_id];
    if (src) {
      const img = el("img");
      img.src = src;
      img.alt = frame.frame_id;
      img.draggable = false; // the cell is what moves, with our own payload
      cell.appendChild(img);
    } else {
      cell.appendChild(el("span", "db-missing", "no thumbnail"));
    }
    if (frame.similarity !== null && frame.similarity !== undefined) {
      cell.appendChild(el("span", "db-sim", Number(frame.similarity).toFixed(2)));
    }
    cell.addEventListener("dragstart", (event) => {
      event.dataTransfer.setData(FRAME_TYPE, JSON.stringify({ frameId: frame.frame_id, clusterId: folderId }));
      event.dataTransfer.setData("text/plain", frame.frame_id);
      event.dataTransfer.effectAllowed = "move";
      cell.classList.add("db-dragging");
      root.classList.add("db-dragging-any");
    });
    cell.addEventListener("dragend", () => {
      cell.classList.remove("db-dragging");
      root.classList.remove("db-dragging-any");
    });
    cell.addEventListener("click", (event) => {
      event.stopPropagation();
      select(frame.frame_id, folderId, cell);
    });
    return cell;
  }

  function makeFolder(folder, thumbs) {
    const node = el("div", "db-folder");
    node.dataset.clusterId = folder.id;
    if (folder.id === "noise") node.classList.add("db-noise");
    const head = el("div", "db-folder-head");
    if (folder.key) head.appendChild(el("span", "db-key", folder.key));
    const name = el("span", "db-name", folder.name);
    name.title = `${folder.name} (${folder.id})`;
    head.appendChild(name);
    const count = el("span", "db-count", String(folder.count));
    count.dataset.role = "count";
    head.appendChild(count);
    const here = el("button", "db-here", "move here");
    here.type = "button";
    here.addEventListener("click", (event) => {
      event.stopPropagation();
      if (selected) move(selected.frameId, selected.clusterId, folder.id);
    });
    head.appendChild(here);
    node.appendChild(head);
    const body = el("div", "db-thumbs");
    for (const frame of folder.frames) body.appendChild(makeThumb(frame, folder.id, thumbs));
    if (!folder.frames.length) body.appendChild(el("div", "db-empty", "empty"));
    node.appendChild(body);
    if (folder.more > 0) node.appendChild(el("div", "db-more", `+${folder.more} more`));
    makeTarget(node, folder.id);
    return node;
  }

  function makeNewFolder() {
    const node = el("div", "db-folder db-new");
    node.dataset.clusterId = "new";
    const head = el("div", "db-folder-head");
    head.appendChild(el("span", "db-key", "+"));
    head.appendChild(el("span", "db-name", "new folder"));
    const here = el("button", "db-here", "move here");
    here.type = "button";
    here.addEventListener("click", (event) => {
      event.stopPropagation();
      if (selected) move(selected.frameId, selected.clusterId, "new");
    });
    head.appendChild(here);
    node.append(head, el("div", "db-empty", "drop a picture here to start a new folder"));
    makeTarget(node, "new");
    return node;
  }

  function draw() {
    const keep = selected;
    const thumbs = model.get("thumbs") || {};
    const folders = model.get("folders") || [];
    const view = model.get("view");
    root.dataset.view = view;
    for (const [name, button] of Object.entries(viewButtons)) {
      button.classList.toggle("db-active", name === view);
      button.setAttribute("aria-pressed", String(name === view));
    }
    const nodes = folders.map((folder) => makeFolder(folder, thumbs));
    // A new cluster can only be opened at the scene level (a character sub-cluster is a scene
    // plus the names stage 03 found, not something to invent by hand).
    if (view === "scene") nodes.push(makeNewFolder());
    grid.replaceChildren(...nodes);
    selected = null;
    root.classList.remove("db-has-selection");
    if (keep) {
      const node = root.querySelector(`.db-thumb[data-frame-id="${CSS.escape(keep.frameId)}"]`);
      if (node) select(keep.frameId, node.dataset.clusterId, node);
    }
  }

  function drawStatus() {
    setStatus(model.get("status") || "", model.get("status_kind") || "info");
  }

  function folderForKey(key) {
    return (model.get("folders") || []).find((folder) => folder.key === key);
  }

  function commitDigits() {
    const folder = folderForKey(digits);
    digits = "";
    digitTimer = null;
    if (!selected) return;
    if (folder) move(selected.frameId, selected.clusterId, folder.id);
    else setStatus("no folder has that number", "error");
  }

  root.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement || event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    let handled = true;
    if (key === "Escape") {
      clearSelection();
    } else if (!selected) {
      handled = false;
    } else if (key === "n" || key === "N") {
      move(selected.frameId, selected.clusterId, "noise");
    } else if (key === "+" && model.get("view") === "scene") {
      move(selected.frameId, selected.clusterId, "new");
    } else if (/^[0-9]$/.test(key)) {
      digits += key;
      if (digitTimer) clearTimeout(digitTimer);
      const longer = (model.get("folders") || []).some(
        (f) => f.key && f.key !== digits && f.key.startsWith(digits),
      );
      if (longer) digitTimer = setTimeout(commitDigits, DIGIT_WAIT_MS);
      else commitDigits();
    } else if (key === "Enter" && digits) {
      if (digitTimer) clearTimeout(digitTimer);
      commitDigits();
    } else {
      handled = false;
    }
    if (handled) {
      event.preventDefault();
      event.stopPropagation();
    }
  });
  // A click on the board's background clears the selection (a click on a thumbnail stops here).
  root.addEventListener("click", (event) => {
    if (event.target === root || event.target === grid) clearSelection();
  });

  // Python answers every move with "done" after the folders and the status are updated, also
  // when nothing changed (a refused move), so the pending marks always go away.
  function onMessage(msg) {
    if (!msg || msg.type !== "done") return;
    delete root.dataset.pending;
    for (const node of root.querySelectorAll(".db-thumb.db-moving")) node.classList.remove("db-moving");
  }

  model.on("msg:custom", onMessage);
  model.on("change:folders", draw);
  model.on("change:thumbs", draw);
  model.on("change:view", draw);
  model.on("change:status", drawStatus);
  model.on("change:status_kind", drawStatus);
  draw();
  drawStatus();

  return () => {
    if (digitTimer) clearTimeout(digitTimer);
    model.off("msg:custom", onMessage);
    model.off("change:folders", draw);
    model.off("change:thumbs", draw);
    model.off("change:view", draw);
    model.off("change:status", drawStatus);
    model.off("change:status_kind", drawStatus);
  };
}

export default { render };
