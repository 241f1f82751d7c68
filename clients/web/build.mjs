/** Builds the web chat into dist/: the page, its stylesheet, and one bundled, minified script. */
import { build } from "esbuild";
import { copyFile, mkdir } from "node:fs/promises";

await mkdir("dist", { recursive: true });
await build({
  entryPoints: ["src/app.js"],
  bundle: true,
  minify: true,
  sourcemap: true,
  format: "esm",
  target: "es2022",
  outfile: "dist/app.js",
});
await copyFile("src/index.html", "dist/index.html");
await copyFile("src/style.css", "dist/style.css");
console.log("clients/web/dist: index.html, app.js, style.css");
