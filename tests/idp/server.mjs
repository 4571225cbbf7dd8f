// The OAuth server the broker's tests and demo talk to: the real `oidc-provider` (an OpenID
// Certified implementation), configured for the client-credentials grant with JWT access
// tokens. Nothing here imitates OAuth; this file only configures the real server and adds two
// read-only endpoints: counters (`/_test/stats`), so tests can prove how many token requests
// and key set (JWKS) and discovery downloads the broker made, and the form of every token
// request (`/_test/requests`), so tests can prove what the broker sent.
//
//
// With `tls` in the config it speaks HTTPS and authenticates clients by their TLS certificate
// (RFC 8705, oidc-provider's mTLS feature): a second HTTPS listener asks for a client
// certificate and serves the token endpoint's mTLS alias, which discovery names
// (`mtls_endpoint_aliases`). There a `tls_client_auth` client proves itself with a certificate
// the client CA issued for its registered subject, a `self_signed_tls_client_auth` client with
// a certificate registered in its `jwks` (`x5c`), and a `certificate_bound` client's tokens
// carry `cnf.x5t#S256`. `POST /_test/revoke {"x5t#S256": "..."}` makes the provider treat that
// certificate as not presented from then on (it answers invalid_client), as a provider that
// no longer accepts an old certificate does.
//
// Usage: node server.mjs <config.json>
//   config: {
//     "port": 0,                                   // 0 = any free port
//     "resource": "api://demo",                    // default audience of the issued JWTs
//     "extra_resources": ["api://token-broker"],   // other audiences a client may ask for
//     "scopes": "read write",                      // scopes the resource server knows
//     "clients": [{ "client_id": "...", "client_secret": "...",
//                   "token_endpoint_auth_method": "client_secret_basic",
//                   "ttl": 3600,                   // access token lifetime in seconds
//                   "roles": ["Tokens.Contoso"],   // optional `roles` claim
//                   "jwks": { "keys": [...] },     // private_key_jwt: the client's public keys;
//                                                  // self_signed_tls_client_auth: keys with x5c
//                   "token_endpoint_auth_signing_alg": "PS256", // optional: the only alg accepted
//                   "tls_client_auth_subject_dn": "CN=...",     // tls_client_auth: the subject
//                   "certificate_bound": true }],  // optional: tokens bound to the certificate
//     "tls": { "cert": "server-cert.pem", "key": "server-key.pem", // optional: HTTPS and mTLS
//              "client_ca": "client-ca.pem",       // the CA tls_client_auth certificates chain to
//              "mtls_port": 0,                     // the mTLS listener's port, 0 = any free port
//              "revoked": ["<x5t#S256>"] }         // optional: certificates revoked already
//   }
// Prints one JSON line when listening: {"issuer", "token_endpoint", "jwks_uri", "port"}, and
// with `tls` also "mtls_token_endpoint" and "mtls_port".

import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { createHash, generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';

import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const ttlByClient = new Map(config.clients.map((c) => [c.client_id, c.ttl ?? 3600]));
const rolesByClient = new Map(config.clients.map((c) => [c.client_id, c.roles]));
const resources = new Set([config.resource, ...(config.extra_resources ?? [])]);

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };

const stats = {
  token_requests: 0, token_issued: 0, token_errors: 0, jwks_requests: 0, discovery_requests: 0,
};
// The last token requests, oldest first: each one's form fields as the provider parsed them
// (every field, known to OAuth or not), whether it carried Basic credentials, and the status.
const MAX_RECORDED = 1000;
const tokenRequests = [];

// RFC 8705: the mTLS listener, its certificates, and what it counted.
const tls = config.tls ? {
  cert: readFileSync(config.tls.cert),
  key: readFileSync(config.tls.key),
  clientCa: readFileSync(config.tls.client_ca),
} : undefined;
if (tls) {
  stats.mtls_connections = 0;
  stats.mtls_connections_with_certificate = 0;
}
// Sockets of the mTLS listener: only a certificate presented there counts.
const mtlsSockets = new WeakSet();
// x5t#S256 of the certificates the test revoked: they count as not presented.
const revoked = new Set(config.tls?.revoked ?? []);

const thumbprint = (certificate) => createHash('sha256').update(certificate.raw).digest('base64url');

// The certificate the client presented on the mTLS listener, whatever it is.
function peerCertificate(ctx) {
  const { socket } = ctx.req;
  if (!mtlsSockets.has(socket)) return undefined;
  return socket.getPeerX509Certificate() ?? undefined;
}

// features.mTLS.getCertificate: the presented certificate, unless the test revoked it.
function getCertificate(ctx) {
  const certificate = peerCertificate(ctx);
  if (!certificate || revoked.has(thumbprint(certificate))) return undefined;
  return certificate;
}

// features.mTLS.certificateAuthorized: the certificate chains to the client CA (TLS verified
// it; the listener does not refuse others, since self-signed certificates must get through).
function certificateAuthorized(ctx) {
  return ctx.req.socket.authorized === true;
}

// A distinguished name in one comparable form: `TYPE=value` parts, types upper-cased, joined
// by commas. Enough for the names the tests register (no escaped commas).
const normalizeDn = (dn) => dn.split(',').map((part) => {
  const [type, ...value] = part.split('=');
  return `${type.trim().toUpperCase()}=${value.join('=').trim()}`;
}).join(',');

// features.mTLS.certificateSubjectMatches: tls_client_auth_subject_dn against the subject
// in RFC 4514 order (Node lists the subject's parts most significant first, one a line).
// The tests register no SAN values, so those never match.
function certificateSubjectMatches(ctx, property, expected) {
  if (property !== 'tls_client_auth_subject_dn') return false;
  const certificate = getCertificate(ctx);
  if (!certificate) return false;
  const subject = certificate.subject.split('\n').reverse().join(',');
  return normalizeDn(subject) === normalizeDn(expected);
}

const CERTIFICATE_AUTH_METHODS = ['tls_client_auth', 'self_signed_tls_client_auth'];
// Clients that authenticate with a key or a certificate have no secret.
const withoutSecret = new Set(['private_key_jwt', ...CERTIFICATE_AUTH_METHODS]);

const server = tls ? createHttpsServer({ cert: tls.cert, key: tls.key }) : createHttpServer();
// The mTLS endpoint alias: asks for a certificate, lets a connection without one or with one
// the client CA did not issue through, and leaves the judgement to the provider.
const mtlsServer = tls ? createHttpsServer({
  cert: tls.cert,
  key: tls.key,
  ca: [tls.clientCa],
  requestCert: true,
  rejectUnauthorized: false,
}) : undefined;
for (const listener of [server, mtlsServer].filter(Boolean)) {
  listener.on('error', (error) => {
    process.stderr.write(`oidc-provider test server: ${error.message}\n`);
    process.exit(1);
  });
}
mtlsServer?.on('secureConnection', (socket) => {
  mtlsSockets.add(socket);
  stats.mtls_connections += 1;
  if (socket.getPeerX509Certificate()) stats.mtls_connections_with_certificate += 1;
});

const listen = (listener, port) => new Promise((resolve) => {
  listener.listen(port, '127.0.0.1', resolve);
});

await listen(server, config.port ?? 0);
if (mtlsServer) await listen(mtlsServer, config.tls.mtls_port ?? 0);
{
  const { port } = server.address();
  const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`;
  const mtlsPort = mtlsServer?.address().port;
  const mtlsTokenEndpoint = tls ? `https://127.0.0.1:${mtlsPort}/token` : undefined;
  const provider = new Provider(issuer, {
    clients: config.clients.map((c) => ({
      client_id: c.client_id,
      ...(withoutSecret.has(c.token_endpoint_auth_method) ? {} : { client_secret: c.client_secret }),
      token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
      // self_signed_tls_client_auth: oidc-provider works each key's x5t#S256 out from its x5c.
      ...(c.jwks ? { jwks: c.jwks } : {}),
      ...(c.token_endpoint_auth_signing_alg
        ? { token_endpoint_auth_signing_alg: c.token_endpoint_auth_signing_alg } : {}),
      ...(c.tls_client_auth_subject_dn
        ? { tls_client_auth_subject_dn: c.tls_client_auth_subject_dn } : {}),
      ...(c.certificate_bound ? { tls_client_certificate_bound_access_tokens: true } : {}),
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: config.scopes ?? 'read write',
    })),
    scopes: (config.scopes ?? 'read write').split(' '),
    jwks: { keys: [signingKey] },
    ...(tls ? {
      clientAuthMethods: [
        'client_secret_basic', 'client_secret_jwt', 'client_secret_post', 'private_key_jwt', 'none',
        ...CERTIFICATE_AUTH_METHODS,
      ],
    } : {}),
    features: {
      ...(tls ? {
        mTLS: {
          enabled: true,
          tlsClientAuth: true,
          selfSignedTlsClientAuth: true,
          certificateBoundAccessTokens: true,
          getCertificate,
          certificateAuthorized,
          certificateSubjectMatches,
        },
      } : {}),
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => config.resource,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resourceIndicator, client) => {
          if (!resources.has(resourceIndicator)) throw new errors.InvalidTarget();
          return {
          scope: config.scopes ?? 'read write',
          audience: resourceIndicator,
          accessTokenFormat: 'jwt',
          accessTokenTTL: ttlByClient.get(client.clientId) ?? 3600,
          jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    extraTokenClaims: async (ctx, token) => {
      const roles = rolesByClient.get(token.clientId);
      return roles ? { roles } : undefined;
    },
    ttl: {
      ClientCredentials: (ctx, token, client) => ttlByClient.get(client.clientId) ?? 3600,
    },
    cookies: { keys: [randomUUID()] },
  });

  provider.use(async (ctx, next) => {
    if (ctx.path === '/_test/stats' && ctx.method === 'GET') {
      ctx.body = stats;
      return;
    }
    if (ctx.path === '/_test/requests' && ctx.method === 'GET') {
      ctx.body = { token_requests: tokenRequests };
      return;
    }
    if (tls && ctx.path === '/_test/revoke' && ctx.method === 'POST') {
      const chunks = [];
      for await (const chunk of ctx.req) chunks.push(chunk);
      let value;
      try {
        value = JSON.parse(Buffer.concat(chunks).toString())['x5t#S256'];
      } catch {
        value = undefined;
      }
      if (typeof value !== 'string' || !value) {
        ctx.status = 400;
        ctx.body = { error: 'a JSON body with the certificate\'s "x5t#S256" is required' };
        return;
      }
      revoked.add(value);
      ctx.body = { revoked: [...revoked] };
      return;
    }
    if (ctx.method === 'GET' && ctx.path === '/jwks') stats.jwks_requests += 1;
    if (ctx.method === 'GET' && ctx.path === '/.well-known/openid-configuration') {
      stats.discovery_requests += 1;
    }
    const isDiscovery = ctx.method === 'GET' && (ctx.path === '/.well-known/openid-configuration'
      || ctx.path === '/.well-known/oauth-authorization-server');
    const isToken = ctx.path === '/token' && ctx.method === 'POST';
    if (isToken) stats.token_requests += 1;
    await next();
    // RFC 8705 §5: oidc-provider does not name the mTLS alias itself.
    if (tls && isDiscovery && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
      ctx.body.mtls_endpoint_aliases = { token_endpoint: mtlsTokenEndpoint };
    }
    if (isToken) {
      if (ctx.status === 200) stats.token_issued += 1;
      else stats.token_errors += 1;
      const form = ctx.oidc?.body;
      const certificate = tls ? peerCertificate(ctx) : undefined;
      tokenRequests.push({
        form: form ? { ...form } : null,
        basic: /^basic /i.test(ctx.get('authorization')),
        status: ctx.status,
        // The certificate presented (revoked or not), and whether the mTLS listener got it.
        ...(tls ? {
          certificate: certificate ? thumbprint(certificate) : null,
          mtls: mtlsSockets.has(ctx.req.socket),
        } : {}),
      });
      if (tokenRequests.length > MAX_RECORDED) tokenRequests.shift();
    }
  });

  const callback = provider.callback();
  server.on('request', callback);
  mtlsServer?.on('request', callback);
  process.stdout.write(`${JSON.stringify({
    issuer,
    port,
    token_endpoint: `${issuer}/token`,
    jwks_uri: `${issuer}/jwks`,
    ...(tls ? { mtls_token_endpoint: mtlsTokenEndpoint, mtls_port: mtlsPort } : {}),
  })}\n`);
}

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    mtlsServer?.close();
    server.close(() => process.exit(0));
  });
}
// A test that dies without stopping us must not leave a server behind.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
