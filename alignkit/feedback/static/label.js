// Keyboard shortcuts and click helpers for the judging form (no inline script: the CSP forbids it).
// Pairwise: 1/A, 2/B, T tie, X both bad. Thumbs (one reply): 1 up, 2 down. Likert (one
// completion): 1-7. Everywhere: S skip, Enter submit. Ranking: click cards best first.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("label-form");
  if (!form) return;
  const kind = form.dataset.kind;
  const count = Number(form.dataset.k);
  const cards = Array.from(form.querySelectorAll(".completion"));
  const submitButton = form.querySelector("#submit");
  const skipButton = form.querySelector("#skip");

  const check = (selector) => {
    const input = form.querySelector(selector);
    if (input) { input.checked = true; refresh(); }
  };

  function refresh() {
    cards.forEach((card) => {
      const position = card.dataset.position;
      let chosen = false;
      if (kind === "pairwise") {
        const picked = form.querySelector("input[name=choice]:checked");
        chosen = picked !== null && picked.value === (position === "0" ? "a" : "b");
      } else if (kind === "ranking") {
        chosen = form.querySelector(`select[name=rank_${position}]`).value !== "";
      } else {
        chosen = form.querySelector(`input[name=rating_${position}]:checked`) !== null;
      }
      card.classList.toggle("chosen", chosen);
    });
  }

  let nextRank = 1;
  cards.forEach((card) => {
    card.addEventListener("click", (event) => {
      if (event.target.closest("input, select, label, button, a")) return;
      const position = card.dataset.position;
      if (kind === "pairwise") {
        check(`input[name=choice][value=${position === "0" ? "a" : "b"}]`);
      } else if (kind === "ranking") {
        const select = form.querySelector(`select[name=rank_${position}]`);
        if (select.value === "" && nextRank <= count) { select.value = String(nextRank++); refresh(); }
      }
    });
  });
  const reset = form.querySelector("#reset-ranks");
  if (reset) {
    reset.addEventListener("click", () => {
      form.querySelectorAll("select[data-rank]").forEach((s) => { s.value = ""; });
      nextRank = 1;
      refresh();
    });
  }
  form.addEventListener("change", refresh);

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest("textarea, input[type=text], input[type=password], select")) return;
    const key = event.key.toLowerCase();
    if (kind === "pairwise") {
      if (key === "1" || key === "a") check("input[name=choice][value=a]");
      else if (key === "2" || key === "b") check("input[name=choice][value=b]");
      else if (key === "t") check("input[name=choice][value=tie]");
      else if (key === "x") check("input[name=choice][value=bad]");
    } else if (kind === "thumbs" && count === 1) {
      if (key === "1" || key === "u") check("input[name=rating_0][value=up]");
      else if (key === "2" || key === "d") check("input[name=rating_0][value=down]");
    } else if (kind === "likert" && count === 1 && /^[1-7]$/.test(key)) {
      check(`input[name=rating_0][value="${key}"]`);
    }
    if (key === "s" && skipButton) {
      event.preventDefault();
      skipButton.click();
    } else if (key === "enter") {
      event.preventDefault();
      form.requestSubmit(submitButton);
    }
  });
  refresh();
});
