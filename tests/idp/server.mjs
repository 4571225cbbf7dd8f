// The OAuth server the broker's tests and demo talk to: the real `oidc-provider` (an OpenID
// Certified implementation), configured for the client-credentials grant with JWT access
// tokens. Nothing here imitates OAuth; this file only configures the real server and adds two
// read-only endpoints: counters (`/_test/stats`), so tests can prove how many token requests
// and key set (JWKS) and discovery downloads the broker made, and the form of every token
// request (`/_test/requests`), so tests can prove what the broker sent.
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
//                   "jwks": { "keys": [...] },     // private_key_jwt: the client's public keys
//                   "token_endpoint_auth_signing_alg": "PS256" }] // optional: the only alg accepted
//   }
// Prints one JSON line when listening: {"issuer", "token_endpoint", "jwks_uri", "port"}.

import { createServer } from 'node:http';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
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

const server = createServer();
server.on('error', (error) => {
  process.stderr.write(`oidc-provider test server: ${error.message}\n`);
  process.exit(1);
});
server.listen(config.port ?? 0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: config.clients.map((c) => ({
      client_id: c.client_id,
      // private_key_jwt clients have no secret: their registered public keys authenticate them.
      ...(c.token_endpoint_auth_method === 'private_key_jwt' ? {} : { client_secret: c.client_secret }),
      token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
      ...(c.jwks ? { jwks: c.jwks } : {}),
      ...(c.token_endpoint_auth_signing_alg
        ? { token_endpoint_auth_signing_alg: c.token_endpoint_auth_signing_alg } : {}),
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: config.scopes ?? 'read write',
    })),
    scopes: (config.scopes ?? 'read write').split(' '),
    jwks: { keys: [signingKey] },
    features: {
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
    if (ctx.method === 'GET' && ctx.path === '/jwks') stats.jwks_requests += 1;
    if (ctx.method === 'GET' && ctx.path === '/.well-known/openid-configuration') {
      stats.discovery_requests += 1;
    }
    const isToken = ctx.path === '/token' && ctx.method === 'POST';
    if (isToken) stats.token_requests += 1;
    await next();
    if (isToken) {
      if (ctx.status === 200) stats.token_issued += 1;
      else stats.token_errors += 1;
      const form = ctx.oidc?.body;
      tokenRequests.push({
        form: form ? { ...form } : null,
        basic: /^basic /i.test(ctx.get('authorization')),
        status: ctx.status,
      });
      if (tokenRequests.length > MAX_RECORDED) tokenRequests.shift();
    }
  });

  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({
    issuer,
    port,
    token_endpoint: `${issuer}/token`,
    jwks_uri: `${issuer}/jwks`,
  })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
// A test that dies without stopping us must not leave a server behind.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
