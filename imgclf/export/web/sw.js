// Keeps what the page needs (the page, its scripts, the model and the runtime) in this
// browser's cache, so that it works with the network cut once it has loaded. The file list
// and the version are filled in by export.py; a new export is a new cache.
'use strict';
const FILES = __FILES__;
const CACHE = 'imgclf-web:' + self.registration.scope + ':__VERSION__';

self.addEventListener('install', event => {
  event.waitUntil(caches.open(CACHE).then(cache => cache.addAll(
    FILES.map(url => new Request(url, {mode: /^https?:/.test(url) ? 'cors' : 'same-origin'}))))
    .then(() => self.skipWaiting()));
});

self.addEventListener('activate', event => {
  const mine = 'imgclf-web:' + self.registration.scope + ':';
  event.waitUntil(caches.keys()
    .then(keys => Promise.all(keys.filter(k => k.startsWith(mine) && k !== CACHE)
                                  .map(k => caches.delete(k))))
    .then(() => self.clients.claim()));
});

// The cache first (the files of one export never change), the network for anything else.
self.addEventListener('fetch', event => {
  if (event.request.method !== 'GET') return;
  event.respondWith(caches.open(CACHE)
    .then(cache => cache.match(event.request, {ignoreSearch: true}))
    .then(hit => hit || fetch(event.request)));
});
