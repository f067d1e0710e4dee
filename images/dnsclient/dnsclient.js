// kubenet-lab's Node.js DNS client: one lookup with Node's own DNS API, as an application calls it.
//   node dnsclient.js lookup NAME   dns.lookup(NAME, {all: true}): getaddrinfo(3) on libuv's thread pool,
//                                   i.e. the C library's resolver and its reading of /etc/resolv.conf
//   node dnsclient.js resolve NAME  dns.resolve4 and dns.resolve6 at once: c-ares, which reads
//                                   /etc/resolv.conf itself (search list, ndots) and sends its own queries
// Prints one JSON line: {"addresses": [...], "error": CODE or null, "ms": duration}.
'use strict';
const dns = require('dns');
const [mode, name] = process.argv.slice(2);
const start = process.hrtime.bigint();
const done = (addresses, error) => {
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  process.stdout.write(JSON.stringify({addresses, error, ms}) + '\n');
  process.exit(error && error !== 'ENOTFOUND' && error !== 'ENODATA' ? 1 : 0);
};
if (mode === 'lookup' && name) {
  dns.lookup(name, {all: true}, (err, found) => done(err ? [] : found.map((a) => a.address), err ? err.code : null));
} else if (mode === 'resolve' && name) {
  const settle = (p) => p.then((v) => ({v}), (e) => ({e: e.code}));
  Promise.all([settle(dns.promises.resolve4(name)), settle(dns.promises.resolve6(name))]).then(([a, aaaa]) => {
    const addresses = [...(a.v || []), ...(aaaa.v || [])];
    done(addresses, addresses.length ? null : (a.e || aaaa.e || 'ENODATA'));
  });
} else {
  process.stderr.write('usage: node dnsclient.js lookup|resolve NAME\n');
  process.exit(64);
}
