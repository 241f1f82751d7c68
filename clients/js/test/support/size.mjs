/**
 * The library's size as an application ships it: bundled and minified with esbuild,
 * then gzipped. Prints the figures; run after `npm run build`.
 */
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const result = await build({
  entryPoints: ["dist/index.js"],
  bundle: true,
  minify: true,
  format: "esm",
  platform: "browser",
  write: false,
});
const code = result.outputFiles[0].contents;
console.log(`@parley/client: ${code.length} bytes minified, ${gzipSync(code, { level: 9 }).length} bytes minified+gzip`);
