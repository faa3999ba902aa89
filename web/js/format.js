// How numbers, dates and EXIF values read on the page.

export function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "–";
  if (n < 1000) return `${n} bytes`;
  const units = ["kB", "MB", "GB", "TB"];
  let value = n;
  let unit = -1;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function seconds(s) {
  if (typeof s !== "number" || !Number.isFinite(s)) return "–";
  if (s === 0) return "0 s";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.round(s / 60)} min`;
}

export function dateTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso ?? "");
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function coordinate(value, positive, negative) {
  const hemisphere = value < 0 ? negative : positive;
  return `${Math.abs(value).toFixed(5)}° ${hemisphere}`;
}

export function osmUrl(lat, lon) {
  const la = lat.toFixed(6);
  const lo = lon.toFixed(6);
  return `https://www.openstreetmap.org/?mlat=${la}&mlon=${lo}#map=15/${la}/${lo}`;
}

// -- EXIF ---------------------------------------------------------------------------------------

// Shown first, in this order (the camera, the exposure, when); then every other tag by name.
export const EXIF_FIRST = [
  "Make",
  "Model",
  "LensMake",
  "LensModel",
  "ExposureTime",
  "FNumber",
  "ISOSpeedRatings",
  "PhotographicSensitivity",
  "FocalLength",
  "FocalLengthIn35mmFilm",
  "DateTimeOriginal",
];

const LABELS = {
  Make: "Camera make",
  Model: "Camera model",
  LensMake: "Lens make",
  LensModel: "Lens",
  ExposureTime: "Exposure time",
  FNumber: "Aperture",
  ISOSpeedRatings: "ISO",
  PhotographicSensitivity: "ISO",
  FocalLength: "Focal length",
  FocalLengthIn35mmFilm: "Focal length (35 mm equivalent)",
  DateTimeOriginal: "Taken",
};

const ORIENTATION = {
  1: "normal",
  2: "mirrored",
  3: "rotated 180°",
  4: "mirrored vertically",
  5: "mirrored, rotated 90° counter-clockwise",
  6: "rotated 90° clockwise",
  7: "mirrored, rotated 90° clockwise",
  8: "rotated 90° counter-clockwise",
};
const METERING = {
  0: "unknown", 1: "average", 2: "center-weighted average", 3: "spot", 4: "multi-spot",
  5: "pattern", 6: "partial", 255: "other",
};
const EXPOSURE_PROGRAM = {
  0: "not defined", 1: "manual", 2: "normal program", 3: "aperture priority",
  4: "shutter priority", 5: "creative", 6: "action", 7: "portrait", 8: "landscape",
};
const ENUMS = {
  Orientation: ORIENTATION,
  MeteringMode: METERING,
  ExposureProgram: EXPOSURE_PROGRAM,
  ExposureMode: { 0: "auto", 1: "manual", 2: "auto bracket" },
  WhiteBalance: { 0: "auto", 1: "manual" },
  ColorSpace: { 1: "sRGB", 2: "Adobe RGB", 65535: "uncalibrated" },
  ResolutionUnit: { 1: "none", 2: "inches", 3: "centimetres" },
  SceneCaptureType: { 0: "standard", 1: "landscape", 2: "portrait", 3: "night" },
};
// Tags Pillow returns as raw bytes (hex here) that hold ASCII text.
const ASCII_HEX = new Set(["ExifVersion", "FlashPixVersion", "InteroperabilityVersion"]);
const MAX_TEXT = 300;

/** "ExifImageWidth" -> "Exif image width"; "GPSLatitudeRef" -> "GPS latitude ref". */
export function exifLabel(tag) {
  if (LABELS[tag]) return LABELS[tag];
  const words = tag
    .replace(/([a-z0-9])([A-Z])/g, "$1 $2")
    .replace(/([A-Z]+)([A-Z][a-z])/g, "$1 $2")
    .split(" ");
  return words
    .map((w, i) => (i === 0 || /^[A-Z0-9]{2,}$/.test(w) ? w : w.toLowerCase()))
    .join(" ");
}

function hexToText(hex) {
  if (typeof hex !== "string" || !/^([0-9a-f]{2})+$/i.test(hex)) return null;
  let out = "";
  for (let i = 0; i < hex.length; i += 2) {
    const code = parseInt(hex.slice(i, i + 2), 16);
    if (code === 0) continue;
    if (code < 0x20 || code > 0x7e) return null;
    out += String.fromCharCode(code);
  }
  return out;
}

function number(n, digits = 2) {
  return Number.isInteger(n) ? String(n) : String(Number(n.toFixed(digits)));
}

function shorten(text) {
  return text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT)}…` : text;
}

/** One EXIF value as text for the table. */
export function exifValue(tag, value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") {
    if (ENUMS[tag] && ENUMS[tag][value] !== undefined) return `${ENUMS[tag][value]} (${value})`;
    switch (tag) {
      case "ExposureTime":
        return value > 0 && value < 1 ? `1/${Math.round(1 / value)} s` : `${number(value)} s`;
      case "FNumber":
        return `f/${number(value, 1)}`;
      case "FocalLength":
      case "FocalLengthIn35mmFilm":
        return `${number(value, 1)} mm`;
      case "ISOSpeedRatings":
      case "PhotographicSensitivity":
        return `ISO ${value}`;
      case "Flash":
        return `${value & 1 ? "fired" : "did not fire"} (${value})`;
      default:
        return number(value, 4);
    }
  }
  if (typeof value === "string") {
    if (ASCII_HEX.has(tag)) return hexToText(value) ?? value;
    if (tag === "UserComment") {
      // An 8-byte character code ("ASCII\0\0\0") and then the text; shown when it is ASCII.
      const text = hexToText(value.slice(16));
      return text === null ? shorten(value) : text.trim() || "(empty)";
    }
    if (/^DateTime/.test(tag) && /^\d{4}:\d{2}:\d{2} /.test(value)) {
      return value.replace(/^(\d{4}):(\d{2}):(\d{2})/, "$1-$2-$3");
    }
    return value === "" ? "(empty)" : shorten(value);
  }
  if (Array.isArray(value)) {
    return shorten(value.map((v) => (typeof v === "number" ? number(v, 4) : String(v))).join(", "));
  }
  if (typeof value === "boolean") return value ? "yes" : "no";
  return shorten(JSON.stringify(value));
}

/** [tag, value] pairs of the EXIF object: EXIF_FIRST first, then the rest by name; the GPS IFD
 * and the decimal coordinates are left to their own sections. */
export function orderedExif(exif) {
  const keys = Object.keys(exif).filter(
    (k) => k !== "GPSInfo" && k !== "latitude" && k !== "longitude",
  );
  const first = EXIF_FIRST.filter((k) => keys.includes(k));
  const rest = keys.filter((k) => !EXIF_FIRST.includes(k)).sort((a, b) => a.localeCompare(b));
  return [...first, ...rest].map((k) => [k, exif[k]]);
}
