// The demo's voting page: draws the emoji grid from /api/list, votes with
// /api/vote?choice=, and shows /api/leaderboard on /leaderboard. Plain DOM, no build step.
"use strict";

const main = document.getElementById("main");
const statusLine = document.getElementById("status");

function say(text, kind) {
  statusLine.textContent = text;
  statusLine.className = kind || "";
}

async function getJSON(url) {
  const response = await fetch(url);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.status + " " + response.statusText;
    throw new Error(message);
  }
  return body;
}

async function vote(emoji) {
  say("voting for " + emoji.unicode + " …");
  try {
    await getJSON("/api/vote?choice=" + encodeURIComponent(emoji.shortcode));
    say("You voted " + emoji.unicode + " " + emoji.shortcode + ". Thanks!", "ok");
  } catch (error) {
    say("Could not vote for " + emoji.unicode + ": " + error.message, "error");
  }
}

async function drawGrid() {
  const list = await getJSON("/api/list");
  const grid = document.createElement("div");
  grid.className = "emoji-grid";
  grid.id = "emoji-grid";
  for (const emoji of list) {
    const button = document.createElement("button");
    button.textContent = emoji.unicode;
    button.title = emoji.shortcode;
    button.dataset.shortcode = emoji.shortcode;
    button.addEventListener("click", () => vote(emoji));
    grid.appendChild(button);
  }
  main.replaceChildren(grid);
  say("Pick your favourite emoji.");
}

async function drawLeaderboard() {
  const results = await getJSON("/api/leaderboard");
  const table = document.createElement("table");
  table.className = "leaderboard";
  table.innerHTML = "<thead><tr><th></th><th>emoji</th><th>votes</th></tr></thead>";
  const body = document.createElement("tbody");
  for (const row of results) {
    const tr = document.createElement("tr");
    for (const text of [row.unicode, row.shortcode, String(row.votes)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  table.appendChild(body);
  main.replaceChildren(table);
  say(results.length ? "Votes so far:" : "No votes yet.");
}

(location.pathname === "/leaderboard" ? drawLeaderboard() : drawGrid()).catch((error) => {
  main.textContent = "";
  say("Could not load: " + error.message, "error");
});
