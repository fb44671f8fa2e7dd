// The cachectl console's only script (docs/console.md, "Live progress"). On a task page whose
// task still runs, it follows the console's SSE stream of the task (/console/tasks/{id}/events)
// and puts each `#live` element the stream sends in place of the page's; the stream ends with a
// `done` event once the task is final, or with a `restart` event after a while (the browser then
// opens it again, as EventSource does). When the stream drops without a `restart`, the browser
// opens it again too and this script fetches the fragment (/console/tasks/{id}/live) meanwhile;
// if the browser gives the stream up, the script fetches the fragment every 2 seconds until the
// task is final. `#task`'s `data-events` counts the events received, `data-stream` tells the
// stream's state (connecting, open, reconnecting, polling, done). Plain DOM, no eval, no inline
// script: the console's Content-Security-Policy allows scripts from /console/assets only.
(function () {
  "use strict";
  var task = document.getElementById("task");
  if (!task) {
    return;
  }
  var source = null;
  var timer = null;
  var received = 0;
  var restarting = false;

  function live() {
    return document.getElementById("live");
  }
  function final() {
    var l = live();
    return !l || l.getAttribute("data-state") !== "running";
  }
  function stream(state) {
    task.setAttribute("data-stream", state);
  }
  function stop() {
    if (source) {
      source.close();
      source = null;
    }
    if (timer) {
      clearInterval(timer);
      timer = null;
    }
    stream("done");
  }
  // Puts the children and state of the `#live` element of `html` (rendered and escaped by the
  // server) into the page's `#live`. The element itself stays, and so does the keyboard focus on
  // a button of it (found again by id); the progress sentence, when it changed, goes to the
  // `role=status` element that screen readers read out.
  function swap(html) {
    var t = document.createElement("template");
    t.innerHTML = html;
    var fresh = t.content.firstElementChild;
    var old = live();
    if (fresh && fresh.id === "live" && old) {
      var focused = document.activeElement;
      var focusId = focused && focused !== old && old.contains(focused) ? focused.id : "";
      var before = document.getElementById("progress-text");
      var said = before ? before.textContent : "";
      old.replaceChildren.apply(old, Array.prototype.slice.call(fresh.childNodes));
      old.setAttribute("data-state", fresh.getAttribute("data-state") || "");
      var after = document.getElementById("progress-text");
      var announce = document.getElementById("announce");
      if (announce && after && after.textContent !== said) {
        announce.textContent = after.textContent;
      }
      var again = focusId ? document.getElementById(focusId) : null;
      if (again) {
        again.focus();
      }
    }
    if (final()) {
      stop();
    }
  }
  function fetchLive() {
    return fetch(task.getAttribute("data-live-url"), { credentials: "same-origin" })
      .then(function (r) {
        if (r.redirected) {
          // Signed out meanwhile: the fragment request was sent to the sign-in page.
          window.location.assign(r.url);
          return;
        }
        if (r.ok) {
          return r.text().then(swap);
        }
      })
      .catch(function () {});
  }
  function poll() {
    stream("polling");
    if (!timer) {
      timer = setInterval(fetchLive, 2000);
    }
    fetchLive();
  }
  function onEvent(e) {
    received += 1;
    task.setAttribute("data-events", String(received));
    var data;
    try {
      data = JSON.parse(e.data);
    } catch (err) {
      return;
    }
    swap(data.html);
  }

  if (final()) {
    stream("done");
    return;
  }
  if (!window.EventSource) {
    poll();
    return;
  }
  stream("connecting");
  source = new EventSource(task.getAttribute("data-events-url"));
  source.onopen = function () {
    restarting = false;
    stream("open");
  };
  source.addEventListener("live", onEvent);
  source.addEventListener("done", onEvent);
  source.addEventListener("restart", function () {
    received += 1;
    task.setAttribute("data-events", String(received));
    restarting = true;
  });
  source.onerror = function () {
    if (!source) {
      return;
    }
    if (restarting && source.readyState !== EventSource.CLOSED) {
      // The server ended the stream on purpose; the browser opens it again in a second.
      restarting = false;
      stream("reconnecting");
      return;
    }
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave the stream up (an error answer, not a stream): fetch the fragment instead.
      source = null;
      poll();
    } else {
      stream("reconnecting");
      fetchLive();
    }
  };
})();
