// The UdaConnect console: the live floor map (/v1/points), the live connection feed (SSE
// /v1/connections/stream), counters (/v1/status), service state (/readyz), people search
// (/v1/persons) and a person's page (/v1/persons/{id}, /live, /connections, and the POC's
// /api/persons/{id}/connection). It calls the documented API only, all through `api()` below.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = 1000;
  const STATUS_MS = 2000;
  const FEED_RETRY_MS = 3000;
  const FEED_MAX_ITEMS = 200;
  const MAP_POINT_LIMIT = 2000;

  // ---- requests -------------------------------------------------------------------------

  /** The service did not answer at all (network error, server down). */
  class Unreachable extends Error {}

  // ---- who is calling ------------------------------------------------------------------

  /**
   * The bearer token (a JWT; an organizer's to see everything) for this tab: from the sign-in
   * form, or from `?access_token=` in the URL that `./dev run` prints, which is then taken out
   * of the address bar. Kept in sessionStorage: closing the tab forgets it.
   */
  const TOKEN_KEY = "udaconnect.token";
  const fromUrl = new URLSearchParams(location.search).get("access_token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    history.replaceState(null, "", location.pathname + location.hash);
  }
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  /**
   * Request headers of every call: the one place the bearer token is added. The feed is the
   * exception: EventSource sends no headers, so it carries the token as `access_token` in its
   * URL (RFC 6750 §2.3), in `connectFeed`.
   */
  function headers() {
    const h = { accept: "application/json" };
    if (token()) h.authorization = `Bearer ${token()}`;
    return h;
  }

  $("signin").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  $("signin").hidden = Boolean(token());
  $("signout").hidden = !token();

  /** GET `path`; resolves to {status, ok, body} (body: parsed JSON or null). */
  async function api(path) {
    let response;
    try {
      response = await fetch(path, { headers: headers(), cache: "no-store" });
    } catch (e) {
      throw new Unreachable(`the service does not answer (${e.message})`);
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      body = null;
    }
    return { status: response.status, ok: response.ok, body };
  }

  /** An error answer in words: the API's `{code, message, field?}`, or the status. */
  function describe(r) {
    if (r.body && r.body.message) {
      const { field, message } = r.body;
      return field && !message.startsWith(`${field}:`) ? `${field}: ${message}` : message;
    }
    return `the service answered HTTP ${r.status}`;
  }

  /** Sets a state line: its text, and `data-state` for its colour (and for tests). */
  function setState(el, text, state) {
    el.textContent = text || "";
    el.dataset.state = state || (text ? "info" : "ok");
  }

  /** Whether a failed call may succeed later: the service unreachable or not ready (503). */
  const retryable = (e) => e instanceof Unreachable || e.status === 503;

  /** The text of a failed call: unreachable, not ready (503), or the API's message. */
  function failure(e, what) {
    if (e instanceof Unreachable) return [`Cannot load ${what}: ${e.message}; retrying.`, "error"];
    if (e.status === 401) return [`Sign in to see ${what}: ${describe(e)}. Paste a token above (\`./dev run\` prints one; \`udaconnect token --role organizer\` mints one).`, "error"];
    if (e.status === 503) return [`The service is not ready, so ${what} cannot be shown: ${describe(e)}. Retrying.`, "not-ready"];
    return [`Cannot load ${what}: ${describe(e)}.`, "error"];
  }

  async function ok(path) {
    const r = await api(path);
    if (!r.ok) throw r;
    return r.body;
  }

  // ---- formatting -----------------------------------------------------------------------

  const utc = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace(/Z$|\+00:00$/, " UTC") : "");
  const meters = (m) => (m < 10 ? m.toFixed(2) : m.toFixed(1));
  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c instanceof Node ? c : String(c));
    return node;
  };

  const names = new Map();
  /** A link to a person's page; its text becomes the person's name once known. */
  function personLink(id) {
    const link = el("a", { href: `#/persons/${id}`, "data-person-link": id }, `#${id}`);
    personName(id).then((name) => {
      if (name) link.textContent = name;
    });
    return link;
  }
  function personName(id) {
    if (!names.has(id)) {
      const name = api(`/v1/persons/${id}`)
        .then((r) => (r.ok ? `${r.body.first_name} ${r.body.last_name}` : null))
        .catch(() => null);
      names.set(id, name);
      // A failed lookup is asked again next time.
      name.then((n) => {
        if (n === null && names.get(id) === name) names.delete(id);
      });
    }
    return names.get(id);
  }

  // ---- the service's state --------------------------------------------------------------

  const service = $("service");
  let serviceBusy = false;
  async function checkService() {
    if (serviceBusy) return;
    serviceBusy = true;
    try {
      const r = await api("/readyz");
      if (r.ok) {
        setState(service, "Ready", "ready");
      } else if (r.status === 503 && r.body && r.body.checks) {
        const down = r.body.checks
          .filter((c) => !c.ok)
          .map((c) => (c.error ? `${c.name} (${c.error})` : c.name));
        setState(service, `Not ready: ${down.join("; ") || "starting"}. Data may be stale; retrying.`, "not-ready");
      } else {
        setState(service, `Not ready: ${describe(r)}; retrying.`, "not-ready");
      }
    } catch (e) {
      setState(service, `Unreachable: ${e.message}; retrying.`, "unreachable");
    } finally {
      serviceBusy = false;
    }
  }

  // ---- counters -------------------------------------------------------------------------

  let lastSample = null;
  let countersBusy = false;
  async function refreshCounters() {
    // One request at a time: a slow answer (PostgreSQL away) must not pile requests up.
    if (countersBusy) return;
    countersBusy = true;
    try {
      const s = await ok("/v1/status");
      $("lag").textContent = String(s.lag_total);
      $("open").textContent = s.open_connections === undefined ? "—" : String(s.open_connections);
      // Reports this process stored: behind a load balancer successive answers may come from
      // different processes, and only two of one process's answers give a rate.
      const now = performance.now();
      if (lastSample && lastSample.node === s.node) {
        const rate = ((s.locations_stored - lastSample.stored) * 1000) / (now - lastSample.at);
        $("rate").textContent = rate >= 0 ? rate.toFixed(rate < 10 ? 1 : 0) : "…";
      }
      lastSample = { stored: s.locations_stored, at: now, node: s.node };
    } catch (e) {
      for (const id of ["rate", "open", "lag"]) $(id).textContent = "—";
      lastSample = null;
    } finally {
      countersBusy = false;
    }
  }

  // ---- the floor map --------------------------------------------------------------------

  let map = null;
  let zoneLayer = null;
  let pointLayer = null;
  // Until the user pans or zooms, the map shows every point (the whole floor, refitted as it
  // grows); after that it asks only for what its view holds, until "Show all".
  let following = true;
  let fitting = false;
  let mapBusy = false;
  const mapState = $("map-state");

  function initMap() {
    if (map) return true;
    if (typeof L === "undefined") {
      setState(mapState, "The map library did not load; the map cannot be shown.", "error");
      return false;
    }
    // No base-map tiles: the floor is drawn on a plain background, with a scale bar.
    map = L.map("map", { attributionControl: false, maxZoom: 22, minZoom: 2 }).setView([0, 0], 2);
    L.control.scale({ imperial: false, maxWidth: 160 }).addTo(map);
    const userMoved = () => {
      if (!fitting) following = false;
    };
    map.on("dragstart", userMoved);
    map.on("zoomstart", userMoved);
    $("show-all").addEventListener("click", () => {
      following = true;
      refreshMap();
    });
    zoneLayer = L.layerGroup().addTo(map);
    pointLayer = L.layerGroup().addTo(map);
    return true;
  }

  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  function bboxParam() {
    const b = map.getBounds().pad(0.1);
    const w = clamp(b.getWest(), -180, 180);
    const e = clamp(b.getEast(), -180, 180);
    const s = clamp(b.getSouth(), -90, 90);
    const n = clamp(b.getNorth(), -90, 90);
    return [w, s, e, n].map((v) => v.toFixed(7)).join(",");
  }

  function ageColour(iso) {
    const age = Date.now() - Date.parse(iso);
    if (age < 10000) return "#cf222e";
    if (age < 60000) return "#fb8f44";
    return "#8c959f";
  }

  async function refreshMap() {
    if (!initMap() || mapBusy) return;
    mapBusy = true;
    let live;
    try {
      const query = following ? "" : `&bbox=${bboxParam()}`;
      live = await ok(`/v1/points?limit=${MAP_POINT_LIMIT}${query}`);
    } catch (e) {
      setState(mapState, ...failure(e, "the floor"));
      return;
    } finally {
      mapBusy = false;
    }
    if (live.points.length === 0 && live.unanswered.length) {
      // Nothing could be read: keep what the map shows, and say why.
      setState(mapState, `No points could be read now (${live.unanswered.join("; ")}); the map shows the last ones. Retrying.`, "not-ready");
      return;
    }
    zoneLayer.clearLayers();
    pointLayer.clearLayers();
    for (const z of live.zones) {
      L.polygon(z.boundary, { color: "#57606a", weight: 1, fill: false, interactive: false, className: "zone" }).addTo(zoneLayer);
    }
    // The answer is newest first; drawn oldest first, so the newest lie on top.
    for (const p of [...live.points].reverse()) {
      const colour = ageColour(p.recorded_at);
      L.circleMarker([p.lat, p.lon], {
        radius: 5,
        color: colour,
        fillColor: colour,
        fillOpacity: 0.8,
        weight: 1,
        className: `point person-${p.person_id}`,
      })
        .bindTooltip(`#${p.person_id} · ${utc(p.recorded_at)}`)
        .on("click", () => {
          location.hash = `#/persons/${p.person_id}`;
        })
        .addTo(pointLayer);
    }
    $("map").dataset.points = String(live.points.length);
    $("map").dataset.zones = String(live.zones.length);
    if (following && live.points.length > 0) {
      // Refitted when a point falls outside the view, or the view is far larger than the
      // points need (the first answer, or a crowd that drew together).
      const bounds = L.latLngBounds(live.points.map((p) => [p.lat, p.lon])).pad(0.2);
      const fits = Math.min(map.getBoundsZoom(bounds), 20);
      if (!map.getBounds().contains(bounds) || fits - map.getZoom() >= 2) {
        fitting = true;
        map.fitBounds(bounds, { maxZoom: 20, animate: false });
        fitting = false;
      }
    }
    $("show-all").hidden = following;
    const notes = [];
    if (live.points.length === 0) {
      notes.push(following ? "No points on the floor yet: nobody reported a location within the window." : "No points in this part of the floor right now.");
    } else {
      notes.push(`${live.points.length} points in ${live.zones.length} zones${live.truncated ? ` (the newest ${live.points.length} only)` : ""}.`);
    }
    if (live.unanswered.length) notes.push(`Part of the cluster did not answer: ${live.unanswered.join("; ")}.`);
    setState(mapState, notes.join(" "), live.unanswered.length ? "not-ready" : live.points.length ? "ok" : "empty");
  }

  // ---- the live connection feed ---------------------------------------------------------

  const feed = $("feed");
  const feedState = $("feed-state");
  let source = null;
  let follow = new Set();
  let paused = false;
  let missed = 0;

  $("feed-pause").addEventListener("click", () => {
    paused = !paused;
    $("feed-pause").textContent = paused ? "Resume" : "Pause";
    $("feed-pause").setAttribute("aria-pressed", String(paused));
    missed = 0;
    setState(feedState, paused ? "Paused." : "", "ok");
  });

  function shown(n) {
    // Each episode is announced to both of its persons: everyone's feed shows it once.
    // Following both persons of a pair shows it once too.
    if (!follow.size) return n.person_id < n.peer_id;
    return follow.has(n.person_id) && !(follow.has(n.peer_id) && n.person_id > n.peer_id);
  }

  function onNotification(event) {
    let n;
    try {
      n = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (!shown(n)) return;
    if (paused) {
      missed += 1;
      setState(feedState, `Paused: ${missed} new since.`, "ok");
      return;
    }
    const item = el(
      "li",
      { "data-type": n.type, "data-person": n.person_id, "data-peer": n.peer_id, "data-id": n.id },
      el("span", { className: "kind" }, n.type.replace("connection.", "")),
      personLink(n.person_id),
      " met ",
      personLink(n.peer_id),
      el("span", { className: "meta" }, ` · ${n.colocations} co-location${n.colocations === 1 ? "" : "s"}, closest ${meters(n.min_distance_m)} m · `),
      el("time", { dateTime: n.ended_at || n.last_seen_at }, utc(n.ended_at || n.last_seen_at)),
    );
    feed.prepend(item);
    while (feed.children.length > FEED_MAX_ITEMS) feed.lastElementChild.remove();
    setState(feedState, "");
  }

  function connectFeed() {
    if (source) source.close();
    const query = token() ? `?access_token=${encodeURIComponent(token())}` : "";
    source = new EventSource(`/v1/connections/stream${query}`);
    setState(feedState, "Connecting to the feed…", "loading");
    source.onopen = () => {
      if (!feed.children.length) setState(feedState, "Listening: no connections yet since this page opened.", "empty");
      else setState(feedState, "");
    };
    for (const type of ["connection.started", "connection.updated", "connection.ended"]) {
      source.addEventListener(type, onNotification);
    }
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (401/403 without an organizer's token, 503 while the pipeline is not ready)
        // or unreachable: try again later.
        setState(feedState, `The feed is not available (no organizer's token, the pipeline is not ready, or the service is unreachable); retrying in ${FEED_RETRY_MS / 1000} s.`, "not-ready");
        setTimeout(connectFeed, FEED_RETRY_MS);
      } else {
        setState(feedState, "The feed was interrupted; reconnecting…", "not-ready");
      }
    };
  }

  $("feed-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    const words = $("feed-persons").value.split(/[\s,]+/).filter(Boolean);
    const bad = words.filter((w) => !/^[1-9]\d{0,17}$/.test(w));
    if (bad.length) {
      setState(feedState, `Follow: not a person id: ${bad.join(", ")}. Still showing ${follow.size ? [...follow].join(", ") : "everyone"}.`, "error");
      return;
    }
    follow = new Set(words.map(Number));
    feed.replaceChildren();
    setState(feedState, follow.size ? `Following ${[...follow].join(", ")}: waiting for their connections.` : "Listening to everyone.", "empty");
  });

  // ---- people ---------------------------------------------------------------------------

  const peopleState = $("people-state");
  let peopleCursor = null;
  let peopleQuery = "";
  // Each load takes a number; an answer that a newer load overtook is dropped.
  let peopleLoad = 0;
  let historyLoad = 0;
  let pocLoad = 0;

  async function loadPeople(more) {
    const tbody = $("people").tBodies[0];
    if (!more) {
      tbody.replaceChildren();
      peopleCursor = null;
    }
    setState(peopleState, "Searching…", "loading");
    const params = new URLSearchParams({ limit: "50" });
    if (peopleQuery) params.set("q", peopleQuery);
    if (more && peopleCursor) params.set("cursor", peopleCursor);
    const load = ++peopleLoad;
    let page;
    try {
      page = await ok(`/v1/persons?${params}`);
      if (load !== peopleLoad) return;
    } catch (e) {
      if (load !== peopleLoad) return;
      setState(peopleState, ...failure(e, "people"));
      retryLater(e, () => loadPeople(more));
      return;
    }
    for (const p of page.items) {
      names.set(p.id, Promise.resolve(`${p.first_name} ${p.last_name}`));
      tbody.append(
        el(
          "tr",
          { "data-person-id": p.id },
          el("td", {}, p.id),
          el("td", {}, el("a", { href: `#/persons/${p.id}` }, `${p.first_name} ${p.last_name}`)),
          el("td", {}, p.company_name),
        ),
      );
    }
    peopleCursor = page.next_cursor || null;
    $("people-more").hidden = !peopleCursor;
    if (!tbody.children.length) {
      setState(peopleState, peopleQuery ? `Nobody matches “${peopleQuery}”.` : "No people yet.", "empty");
    } else {
      setState(peopleState, "");
    }
  }

  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = `#/people?q=${encodeURIComponent($("q").value.trim())}`;
  });
  $("people-more").addEventListener("click", () => loadPeople(true));

  // ---- a person's page ------------------------------------------------------------------

  let personId = null;
  let historyCursor = null;

  async function loadPerson(id) {
    personId = id;
    // Queries still running for the previous person are dropped.
    pocLoad += 1;
    historyLoad += 1;
    $("person-name").textContent = `Person #${id}`;
    setState($("person-state"), "Loading…", "loading");
    // Nothing of the previous person stays on the page.
    for (const t of ["history", "poc"]) $(t).tBodies[0].replaceChildren();
    for (const f of ["live-zone", "live-location", "live-open"]) $(f).textContent = "—";
    for (const f of ["live-state", "history-state", "poc-state"]) setState($(f), "");
    for (const f of ["poc-start", "poc-end", "history-from", "history-to"]) $(f).value = "";
    $("history-more").hidden = true;
    try {
      const p = await ok(`/v1/persons/${id}`);
      if (id !== personId) return; // another person's page meanwhile
      $("person-name").textContent = `${p.first_name} ${p.last_name}`;
      setState($("person-state"), `#${p.id} · ${p.company_name}`, "ok");
    } catch (e) {
      if (id !== personId) return;
      if (e.status === 404 || e.status === 400) {
        setState($("person-state"), e.status === 404 ? `No person with id ${id}.` : describe(e), "empty");
        return;
      }
      setState($("person-state"), ...failure(e, "this person"));
      retryLater(e, () => loadPerson(id));
      return;
    }
    loadLive(id);
    loadHistory(false);
  }

  async function loadLive(id) {
    const state = $("live-state");
    for (const f of ["live-zone", "live-location", "live-open"]) $(f).textContent = "…";
    let live;
    try {
      live = await ok(`/v1/persons/${id}/live`);
      if (id !== personId) return;
    } catch (e) {
      if (id !== personId) return;
      for (const f of ["live-zone", "live-location", "live-open"]) $(f).textContent = "—";
      setState(state, ...failure(e, "the live state"));
      retryLater(e, () => loadLive(id));
      return;
    }
    $("live-zone").textContent = live.current_zone || "—";
    const last = live.last_location;
    $("live-location").textContent = last ? `${last.lat.toFixed(6)}, ${last.lon.toFixed(6)} at ${utc(last.recorded_at)}` : "—";
    const open = $("live-open");
    open.replaceChildren();
    const peers = live.open_connections;
    open.append(peers.length ? `${peers.length}: ` : "none");
    peers.forEach((c, i) => {
      if (i) open.append(", ");
      open.append(personLink(c.peer_id), el("span", { className: "meta" }, ` since ${utc(c.started_at)}`));
    });
    setState(state, live.owner ? "" : "Not seen within the window: no live state.", live.owner ? "ok" : "empty");
    if (!$("poc-start").value && last) {
      const day = last.recorded_at.slice(0, 10);
      $("poc-start").value = day;
      $("poc-end").value = new Date(Date.parse(`${day}T00:00:00Z`) + 86400000).toISOString().slice(0, 10);
    }
  }

  function utcParam(input) {
    return input.value ? `${input.value.length === 16 ? `${input.value}:00` : input.value}Z` : null;
  }

  async function loadHistory(more) {
    const tbody = $("history").tBodies[0];
    const state = $("history-state");
    if (!more) {
      tbody.replaceChildren();
      historyCursor = null;
    }
    const params = new URLSearchParams({ limit: "100" });
    const from = utcParam($("history-from"));
    const to = utcParam($("history-to"));
    if (from) params.set("from", from);
    if (to) params.set("to", to);
    if (more && historyCursor) params.set("cursor", historyCursor);
    setState(state, "Loading…", "loading");
    const load = ++historyLoad;
    let page;
    try {
      page = await ok(`/v1/persons/${personId}/connections?${params}`);
      if (load !== historyLoad) return;
    } catch (e) {
      if (load !== historyLoad) return;
      setState(state, ...failure(e, "the history"));
      retryLater(e, () => loadHistory(more));
      return;
    }
    for (const c of page.items) {
      tbody.append(
        el(
          "tr",
          { "data-peer": c.peer.id, "data-started-at": c.started_at, "data-ended-at": c.ended_at || "" },
          el(
            "td",
            {},
            el("a", { href: `#/persons/${c.peer.id}` }, `${c.peer.first_name} ${c.peer.last_name}`),
            el("span", { className: "meta" }, ` #${c.peer.id}`),
          ),
          el("td", {}, el("time", { dateTime: c.started_at }, utc(c.started_at))),
          el("td", {}, c.ended_at ? el("time", { dateTime: c.ended_at }, utc(c.ended_at)) : "open"),
          el("td", {}, c.colocations),
          el("td", {}, meters(c.min_distance_m)),
        ),
      );
    }
    historyCursor = page.next_cursor || null;
    $("history-more").hidden = !historyCursor;
    setState(state, tbody.children.length ? "" : "No connections in this range.", tbody.children.length ? "ok" : "empty");
  }

  $("history-range").addEventListener("submit", (e) => {
    e.preventDefault();
    loadHistory(false);
  });
  $("history-more").addEventListener("click", () => loadHistory(true));

  $("poc-range").addEventListener("submit", async (e) => {
    e.preventDefault();
    const tbody = $("poc").tBodies[0];
    const state = $("poc-state");
    tbody.replaceChildren();
    const params = new URLSearchParams({
      start_date: $("poc-start").value,
      end_date: $("poc-end").value,
      distance: $("poc-distance").value || "5",
    });
    setState(state, "Searching…", "loading");
    const load = ++pocLoad;
    let rows;
    try {
      rows = await ok(`/api/persons/${personId}/connection?${params}`);
      if (load !== pocLoad) return;
    } catch (err) {
      if (load !== pocLoad) return;
      setState(state, ...failure(err, "who was near"));
      return;
    }
    for (const r of rows) {
      tbody.append(
        el(
          "tr",
          { "data-person-id": r.person.id },
          el("td", {}, el("a", { href: `#/persons/${r.person.id}` }, `${r.person.first_name} ${r.person.last_name}`)),
          el("td", {}, `${r.location.latitude}, ${r.location.longitude}`),
          el("td", {}, r.location.creation_time.replace("T", " ")),
        ),
      );
    }
    setState(state, rows.length ? "" : "Nobody was within that distance on those days.", rows.length ? "ok" : "empty");
  });

  // ---- views ----------------------------------------------------------------------------

  /** Runs `load` again in a few seconds if `e` may pass and the page still shows the same view. */
  function retryLater(e, load) {
    if (!retryable(e)) return;
    const hash = location.hash;
    setTimeout(() => {
      if (location.hash === hash) load();
    }, FEED_RETRY_MS);
  }

  let floorTimers = [];
  function showFloor(on) {
    for (const t of floorTimers) clearInterval(t);
    floorTimers = [];
    if (!on) return;
    refreshMap();
    refreshCounters();
    floorTimers.push(setInterval(refreshMap, REFRESH_MS), setInterval(refreshCounters, STATUS_MS));
    if (map) setTimeout(() => map.invalidateSize(), 0);
  }

  function route() {
    const hash = location.hash || "#/";
    let view = "floor";
    const person = hash.match(/^#\/persons\/(-?\d+)/);
    if (person) view = "person";
    else if (hash.startsWith("#/people")) view = "people";
    for (const v of ["floor", "people", "person"]) $(`${v}-view`).hidden = v !== view;
    for (const a of document.querySelectorAll("nav a")) {
      const current = a.dataset.nav === (view === "person" ? "people" : view);
      a.classList.toggle("current", current);
      if (current) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    showFloor(view === "floor");
    if (view === "people") {
      peopleQuery = new URLSearchParams(hash.split("?")[1] || "").get("q") || "";
      $("q").value = peopleQuery;
      loadPeople(false);
    } else if (view === "person") {
      loadPerson(Number(person[1]));
    }
  }

  // For the browser's developer tools (and the console's test): the Leaflet map.
  window.udaconnect = { map: () => map };

  window.addEventListener("hashchange", route);
  checkService();
  setInterval(checkService, STATUS_MS);
  connectFeed();
  route();
})();
