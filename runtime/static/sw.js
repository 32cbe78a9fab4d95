// The service worker of an exported kiosk site (vae-run export-web writes it beside
// index.html, with the site's version below): on the first load it caches every file of the
// site, then answers from that cache, so the kiosk keeps working with the network gone. A
// site exported again has another version, so the browser installs the new worker, which
// caches the new files and drops the old ones.
"use strict";

const VERSION = "unversioned";
const CACHE = `vae-kiosk-${VERSION}`;

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const { site } = await (await fetch("api/info", { cache: "no-cache" })).json();
    const cache = await caches.open(CACHE);
    // The page has put the files it checked here already.
    await Promise.all(["./", "api/info", ...site.cache].map(async (name) => {
      if (!(await cache.match(name))) await cache.add(new Request(name, { cache: "no-cache" }));
    }));
    await self.skipWaiting();
  })());
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith("vae-kiosk-") && name !== CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

self.addEventListener("fetch", (event) => {
  if (event.request.method !== "GET") return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    const hit = await cache.match(event.request, { ignoreSearch: true });
    return hit || fetch(event.request);
  })());
});
