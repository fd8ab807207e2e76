// The live calls, kept current from /console/events (Server-Sent Events).
// Everything a call says arrives as data and is put in the page with textContent: never
// parsed as HTML, whatever a caller or a contact's name holds.
"use strict";

(function () {
  const list = document.getElementById("calls");
  if (!list) return;
  const blank = document.getElementById("call-card");
  const none = document.getElementById("no-calls");
  const streamState = document.getElementById("stream-state");
  const cards = new Map();
  for (const card of list.querySelectorAll("section.call")) cards.set(card.dataset.call, card);

  const LABELS = { caller: "Caller: ", bot: "Bot: ", heard: "Heard before the barge-in: ", barge_in: "Barge-in" };

  function setText(card, selector, text) {
    const el = card.querySelector(selector);
    if (el) el.textContent = text == null ? "" : String(text);
  }

  function since(epoch) {
    const d = new Date(epoch * 1000);
    return d.toLocaleString();
  }

  function addCard(call) {
    let card = cards.get(call.c);
    if (!card) {
      card = blank.content.firstElementChild.cloneNode(true);
      card.dataset.call = call.c;
      const id = encodeURIComponent(call.c);
      card.querySelector("a.details").setAttribute("href", "/console/calls/" + id);
      for (const action of ["hangup", "transfer", "say"]) {
        card.querySelector("form." + action).setAttribute("action", "/console/calls/" + id + "/" + action);
      }
      list.appendChild(card);
      cards.set(call.c, card);
    }
    setText(card, ".nombre", call.nombre);
    setText(card, ".number", call.number);
    setText(card, ".direction", call.direction);
    setText(card, ".mode", call.mode);
    setText(card, ".since", since(call.started_at || Date.now() / 1000));
    setText(card, ".state", call.state || "connecting");
    const transcript = card.querySelector(".transcript");
    if (call.transcript) {
      transcript.replaceChildren();
      for (const line of call.transcript) addLine(card, line);
    }
    none.hidden = cards.size > 0;
    return card;
  }

  function addLine(card, event) {
    const li = document.createElement("li");
    li.className = "line " + event.k;
    li.textContent = (LABELS[event.k] || "") + (event.text || "");
    card.querySelector(".transcript").appendChild(li);
  }

  function onCall(event) {
    if (event.k === "start") {
      addCard(event);
      return;
    }
    const card = cards.get(event.c);
    if (!card) return;
    if (event.k === "end") {
      card.remove();
      cards.delete(event.c);
      none.hidden = cards.size > 0;
    } else if (event.k === "state") {
      setText(card, ".state", event.state);
    } else if (LABELS[event.k] !== undefined) {
      addLine(card, event);
    }
  }

  const source = new EventSource(list.dataset.events);
  source.addEventListener("open", function () { streamState.textContent = "live"; });
  source.addEventListener("error", function () { streamState.textContent = "reconnecting…"; });
  source.addEventListener("snapshot", function (message) {
    const calls = JSON.parse(message.data);
    const seen = new Set(calls.map(function (c) { return c.c; }));
    for (const [id, card] of cards) {
      if (!seen.has(id)) { card.remove(); cards.delete(id); }
    }
    for (const call of calls) addCard(call);
    none.hidden = cards.size > 0;
  });
  source.addEventListener("call", function (message) { onCall(JSON.parse(message.data)); });
  source.addEventListener("reload", function () { window.location.reload(); });
})();
