// The Express parity app: plain behind apitally-proxy, or with the official middleware.
// Run: node app.js <port>   (listens on 127.0.0.1; PARITY_MODE=official for the middleware)
"use strict";

const express = require("express");
const { body, validationResult } = require("express-validator");

// api key -> consumer; the same table as tests/apps/parity_common.py.
const CONSUMERS = {
  "key-acme": { identifier: "acme", name: "Acme Corp", group: "Enterprise" },
  "key-muller": { identifier: "muller", name: "Müller & Söhne", group: "Free" },
  "key-solo": { identifier: "solo" },
};

function consumerFor(req) {
  const auth = req.headers.authorization || "";
  return auth.startsWith("Bearer ") ? CONSUMERS[auth.slice(7)] : undefined;
}

const app = express();
// Error pages without stack traces: the same 500 body with and without the official client.
app.set("env", "production");

if (process.env.PARITY_MODE === "official") {
  const { useApitally, setConsumer } = require("apitally/express");
  useApitally(app, { clientId: process.env.APITALLY_CLIENT_ID, env: process.env.APITALLY_ENV });
  app.use((req, res, next) => {
    const consumer = consumerFor(req);
    if (consumer) setConsumer(req, { ...consumer });
    next();
  });
} else {
  // With apitally-proxy: name the consumer in response headers (error responses included).
  app.use((req, res, next) => {
    const consumer = consumerFor(req); // { identifier, name, group }
    if (consumer) {
      res.set("X-Apitally-Consumer", encodeURIComponent(consumer.identifier));
      if (consumer.name) res.set("X-Apitally-Consumer-Name", encodeURIComponent(consumer.name));
      if (consumer.group) res.set("X-Apitally-Consumer-Group", encodeURIComponent(consumer.group));
    }
    next();
  });
}

app.use(express.json());

app.get("/items", (req, res) => {
  res.json([{ name: "a" }, { name: "b" }]);
});

app.post("/items", body("name").isString(), body("price").isNumeric(), (req, res) => {
  const errors = validationResult(req);
  if (!errors.isEmpty()) {
    return res.status(400).json({ errors: errors.array() });
  }
  res.status(201).json({ name: req.body.name });
});

app.get("/items/:itemId", (req, res) => {
  const itemId = Number(req.params.itemId);
  if (itemId > 100) {
    return res.status(404).json({ error: "no such item" });
  }
  res.json({ id: itemId });
});

app.get("/users/:userId/orders/:orderId", (req, res) => {
  res.json({ user: Number(req.params.userId), order: Number(req.params.orderId) });
});

app.get("/boom", () => {
  throw new Error("boom");
});

const port = Number(process.argv[2] || process.env.PORT || 3000);
const server = app.listen({ host: "127.0.0.1", port });

// SIGTERM: close the server. The Express integration registers no shutdown hook of its
// own (the Fastify plugin syncs in onClose): the client's final sync is called here, from
// the module the middleware uses (the package exports no path to it).
process.on("SIGTERM", () => {
  server.close(async () => {
    if (process.env.PARITY_MODE === "official") {
      const dist = require("node:path").dirname(require.resolve("apitally/express"));
      await require(`${dist}/../common/client.cjs`).ApitallyClient.shutdown();
    }
    process.exit(0);
  });
});
