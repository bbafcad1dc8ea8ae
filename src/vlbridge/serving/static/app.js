// The vlbridge page: caption an image, chat about it, search the indexed collection. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, history: [] };

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("vlbridge-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("vlbridge-api-key", keyInput.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function api(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || response.status + " " + response.statusText);
  return data;
}

// ---------------------------------------------------------------------------------------------- image + caption
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function useFile(file) {
  if (!file) return;
  $("image-error").textContent = "";
  $("caption").textContent = "…";
  state.image = await readFile(file);
  state.history = [];
  $("chat-log").textContent = "";
  const preview = $("preview");
  preview.src = state.image;
  preview.hidden = false;
  $("search-by-image").disabled = false;
  try {
    const data = await api("/v1/captions", { image: state.image });
    $("caption").textContent = data.data[0].caption || "(empty caption)";
  } catch (err) {
    $("caption").textContent = "";
    $("image-error").textContent = err.message;
  }
}

$("file-input").addEventListener("change", (e) => useFile(e.target.files[0]));
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  useFile(e.dataTransfer.files[0]);
});

// ---------------------------------------------------------------------------------------------- chat
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
}

$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  if (!state.image) { addMessage("error", "Choose an image first."); return; }
  $("chat-input").value = "";
  addMessage("user", text);
  const messages = [];
  state.history.forEach(([q, a], i) => {
    const content = [{ type: "text", text: q }];
    if (i === 0) content.unshift({ type: "image_url", image_url: { url: state.image } });
    messages.push({ role: "user", content }, { role: "assistant", content: a });
  });
  const last = [{ type: "text", text }];
  if (!state.history.length) last.unshift({ type: "image_url", image_url: { url: state.image } });
  messages.push({ role: "user", content: last });
  try {
    const data = await api("/v1/chat/completions", { messages, max_tokens: 30 });
    const reply = data.choices[0].message.content;
    state.history.push([text, reply]);
    addMessage("assistant", reply || "(empty reply)");
  } catch (err) {
    addMessage("error", err.message);
  }
});

// ---------------------------------------------------------------------------------------------- search
async function thumbnail(url) {
  const h = keyInput.value ? { Authorization: "Bearer " + keyInput.value } : {};
  const response = await fetch(url, { headers: h });
  if (!response.ok) return "";
  return URL.createObjectURL(await response.blob());
}

async function search(query) {
  const status = $("search-status");
  const gallery = $("gallery");
  status.textContent = "Searching…";
  gallery.textContent = "";
  try {
    const data = await api("/v1/search", { ...query, k: 12 });
    status.textContent = data.data.length + " of " + data.index_size + " images";
    for (const hit of data.data) {
      const figure = document.createElement("figure");
      figure.className = "result";
      const img = document.createElement("img");
      img.alt = hit.path;
      const caption = document.createElement("figcaption");
      caption.textContent = hit.path + " · " + hit.score.toFixed(3);
      figure.append(img, caption);
      gallery.appendChild(figure);
      thumbnail(hit.thumbnail).then((src) => { img.src = src; });
    }
  } catch (err) {
    status.textContent = err.message;
  }
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("search-input").value.trim();
  if (text) search({ text, rerank: $("search-rerank").checked });
});
$("search-by-image").addEventListener("click", () => { if (state.image) search({ image: state.image }); });

fetch("/v1/models", { headers: headers() })
  .then((r) => r.json())
  .then((d) => { if (d.data) $("model-name").textContent = d.data[0].id; })
  .catch(() => {});
